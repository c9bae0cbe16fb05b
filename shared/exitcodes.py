"""Reserved exit codes: between the monitor and its children, and CONFIG for any
service that cannot start as configured (supervisord shows the code).

Like gunicorn's boot and app-load errors: they tell the monitor not to
restart a child that cannot come up as things stand.
"""

OK = 0
#: The child failed MAX_RETRIES times in a row and waits out its cool-down.
GAVE_UP = 75
#: The child's monitor died before the child could tell (it must not run alone).
ORPHANED = 76
#: The child's fence passed (its monitor's lease could no longer be trusted):
#: it disconnected on its own. Not a crash.
FENCED = 77
#: The connection's settings are unusable (unknown parser, bad topics...).
CONFIG = 78
