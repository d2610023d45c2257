"""The test application: a SQLite writer/query server (dmrecover.demo.sampleapp, shipped in the
package so that `dmrecover demo` works from an installed copy).

    python -m tests.apps.sqlapp serve --data MOUNT --state OUTSIDE   # or: stop --state OUTSIDE

See dmrecover/sampleapp.py for the protocol: every commit is durable (synchronous=EXTRA) and
its key then appended (fsync'd) to OUTSIDE/acks.log; queries go to the Unix socket
OUTSIDE/app.sock; `stop` or SIGTERM stops it cleanly.
"""

import sys

from dmrecover.demo.sampleapp import main

if __name__ == "__main__":
    sys.exit(main())
