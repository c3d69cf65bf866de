"""Embedded components: one SQLite database file in the host's state directory.

One module per building block (``state``, ``lock``, ``sequencer``, ``configuration``,
``pubsub``) over the shared connection helper in ``database``; every name is importable
from this package too.

Every component opens its own connection to the file (WAL journal, ``synchronous=FULL``:
a write is on disk before the call returns, so an acknowledged save survives ``kill -9``
of the host and a power cut) and serialises its calls with a lock, so one instance may be
used from any number of threads. Several components share one file: each keeps its rows
apart under its store name (the component's name in the registry).

Semantics shared with the Redis backend (the conformance suite pins them):

- **State.** Etags are decimal strings of a counter per store, incremented on every write
  to any key: a key deleted and written again never gets back an etag it had before.
  An empty etag means "no etag". ``set``/``delete`` with an etag on a missing key fail
  with ETagMismatch. ``transact`` applies its ops in order inside one transaction; the
  first mismatch rolls all of them back.
- **Lock.** Expiry by wall-clock time. Not re-entrant: while the lock is held (and not
  expired), ``try_lock`` is refused to every owner, its holder included. Unlock of a
  free or expired lock is LOCK_UNEXIST, by another owner LOCK_BELONG_TO_OTHERS.
- **Sequencer.** Ids start at 1 and grow by one per call, durably.
- **Pub/sub.** See ``SqlitePubSub``.
- **Configuration.** ``set``/``delete`` are the admin methods; they notify this
  instance's subscribers after the change is committed.
"""

from layotto.host.components.sqlite.configuration import SqliteConfigStore
from layotto.host.components.sqlite.database import Database
from layotto.host.components.sqlite.lock import SqliteLockStore
from layotto.host.components.sqlite.pubsub import (
    DEFAULT_CONTENT_TYPE,
    DEFAULT_MAX_BACKLOG,
    DEFAULT_MAX_SUBSCRIPTIONS,
    SqlitePubSub,
)
from layotto.host.components.sqlite.sequencer import SqliteSequencer
from layotto.host.components.sqlite.state import SqliteStateStore

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "DEFAULT_MAX_BACKLOG",
    "DEFAULT_MAX_SUBSCRIPTIONS",
    "Database",
    "SqliteConfigStore",
    "SqliteLockStore",
    "SqlitePubSub",
    "SqliteSequencer",
    "SqliteStateStore",
]
