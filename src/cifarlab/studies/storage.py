"""Where a study's trials are kept: the journal file in the study folder (one machine), or a
PostgreSQL / MySQL database that every worker reaches (many machines).

A database study records a heartbeat for each running trial (Optuna's RDBStorage); a trial
whose worker sent none for the grace period is failed by the next worker that looks, and
queued once more with the same settings, seed and run name (Optuna's
RetryHeartbeatStaleTrialCallback), so it resumes from its run folder's last.pt. SQLite is
refused: Optuna advises against it for workers that write at once.
"""

from __future__ import annotations

import os
import random
import time
import warnings
from pathlib import Path
from typing import Any

from cifarlab.errors import UserError, import_package

JOURNAL_FILE = "journal.log"
SCHEMES = ("postgresql", "mysql")
CONNECT_TIMEOUT = 10  # seconds to reach the database before giving up
# Seconds between a running trial's heartbeats, and without one before it is retried.
# CIFARLAB_HEARTBEAT="INTERVAL,GRACE" sets them (tests use short ones).
HEARTBEAT = (60, 180)


def require_optuna(command: str) -> None:
    """Refuse `command` at its start, before it writes anything, when Optuna is missing (it
    is imported where a study is opened; no other command needs it)."""
    import_package("optuna", "optuna", command, "pip install optuna")


def heartbeat() -> tuple[int, int]:
    raw = os.environ.get("CIFARLAB_HEARTBEAT")
    if not raw:
        return HEARTBEAT
    try:
        interval, grace = (int(x) for x in raw.split(","))
    except ValueError:
        interval = grace = 0
    if not 1 <= interval < grace:
        raise UserError(f"CIFARLAB_HEARTBEAT={raw}: give INTERVAL,GRACE in whole seconds with "
                        f"1 <= INTERVAL < GRACE, e.g. {HEARTBEAT[0]},{HEARTBEAT[1]}")
    return interval, grace


def masked(url: str) -> str:
    """The URL with its password hidden, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing to hide that we can find
        return url.split("@")[-1] if "@" in url else url


def open_storage(folder: Path, url: str | None) -> Any:
    """Optuna's storage: the journal in `folder`, or the database at `url` with heartbeats."""
    if url is None:
        from optuna.storages import JournalStorage

        try:
            from optuna.storages.journal import JournalFileBackend
        except ImportError:  # optuna < 4.0
            from optuna.storages import JournalFileStorage as JournalFileBackend
        return JournalStorage(JournalFileBackend(str(Path(folder) / JOURNAL_FILE)))
    return open_database(url)


def open_database(url: str) -> Any:
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme == "sqlite":
        raise UserError(f"--storage {url}: SQLite does not take workers that write at once; "
                        "leave --storage out for the journal file in the study folder (one "
                        "machine), or give a postgresql:// or mysql:// URL")
    if scheme == "postgres":
        scheme, url = "postgresql", "postgresql" + url[len("postgres"):]
    if scheme not in SCHEMES or "://" not in url:
        raise UserError(f"--storage {masked(url)}: give a database URL, "
                        "postgresql://USER:PASSWORD@HOST:PORT/DB or mysql://...")
    import optuna
    import sqlalchemy.exc

    given = url
    if scheme == "postgresql" and url.split(":", 1)[0].lower() == "postgresql":
        url = "postgresql+psycopg" + url[len("postgresql"):]  # psycopg 3: cifarlab[cluster]
    interval, grace = heartbeat()
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                stale = ({"heartbeat_stale_trial_callback": retry()} if retry is not None else
                         {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback()})
                return optuna.storages.RDBStorage(
                    url, engine_kwargs={"connect_args": {"connect_timeout": CONNECT_TIMEOUT}},
                    heartbeat_interval=interval, grace_period=grace, **stale)
        except ModuleNotFoundError as e:
            raise UserError(f"--storage {masked(given)}: its driver is not installed "
                            f"({e.name}); pip install 'cifarlab[cluster]'") from None
        except sqlalchemy.exc.IntegrityError:
            # Workers that start at once on a new database race to create its tables.
            time.sleep(0.5 + random.random() * (attempt + 1))
        except (sqlalchemy.exc.SQLAlchemyError, ValueError) as e:
            first = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:160]
            raise UserError(f"--storage {masked(given)}: cannot reach the database ({first}); "
                            "check the host, port, user and password, and that the server "
                            "runs and takes connections from here") from None
    raise UserError(f"--storage {masked(given)}: could not set up Optuna's tables in the "
                    "database; run the command again")
