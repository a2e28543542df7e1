"""Where images come from and how they are split and augmented."""
