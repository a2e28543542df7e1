"""The optional parts of a training recipe, each small and tested on its own; train.py's loop
composes them: optimizer and schedule (optim.py), mixup and CutMix (mixing.py), the moving
average of the weights (ema.py), lookahead (lookahead.py) and TensorBoard logging (board.py)."""
