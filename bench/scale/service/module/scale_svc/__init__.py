"""Workers of bench/scale's service.

``work``: ``SCALE SLEEP`` sleeps 1 s; ``SCALE CPU`` spins until this process has used 1 s of
CPU (``time.process_time``): a fixed amount of work, so under contention it takes longer
than 1 s of wall time, as a real CPU-bound job would. ``noop`` does nothing.
"""

import time

SECONDS = 1.0


def work(jobName, headers, params, added_params, **kwargs):
    if str(headers.get("SeriesDescription") or "").upper() == "SCALE CPU":
        start = time.process_time()
        n = 0
        while time.process_time() - start < SECONDS:
            for i in range(10000):
                n += i * i
        return
    time.sleep(SECONDS)


def noop(jobName, headers, params, added_params, **kwargs):
    pass
