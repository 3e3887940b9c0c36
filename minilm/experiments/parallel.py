"""Run independent training runs side by side, one single-threaded process per CPU core.

The recall and stability experiments train many small models (D = 64, batch 32 x 64 tokens). At
that size BLAS and Numba gain almost nothing from a second thread (one run: 0.10 s per step with
two threads, 0.09 s with one, on a 2-core machine), so two single-threaded runs at once nearly
double the number of steps a time budget buys. Each run is a pure function of its arguments
(seeded), so the results do not depend on the number of workers.

Workers are fresh processes ("spawn", not "fork": a forked child would inherit the parent's BLAS
and Numba thread pools in an undefined state). The thread counts are read from the environment
when a worker imports NumPy and Numba, so they are set in os.environ while the workers start and
restored right after. Without that, three such runs with two threads each on two cores took 12x
longer per step than one run alone.
"""
import multiprocessing
import os

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def default_workers(limit=2):
    """Processes to use: the usable CPU cores, at most `limit` (1 when only one core is usable)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                       # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(limit, cores))


def _call(task):
    function, index, job = task
    return index, function(job)


def run_jobs(function, jobs, workers, on_result=None):
    """[function(job) for job in jobs], computed by `workers` processes (in this process when
    workers <= 1 or there is a single job).

    function: a module-level function (it is pickled by name) taking one job.
    on_result(index, result): called in this process as each job finishes (in finishing order).
    An exception in a job, or one raised in this process while waiting (a KeyboardInterrupt, a
    deadline), stops the workers at once and propagates.
    """
    jobs = list(jobs)
    results = [None] * len(jobs)
    if workers <= 1 or len(jobs) <= 1:
        for index, job in enumerate(jobs):
            results[index] = function(job)
            if on_result is not None:
                on_result(index, results[index])
        return results

    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update({name: "1" for name in THREAD_VARIABLES})
    try:
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        tasks = [(function, index, job) for index, job in enumerate(jobs)]
        for index, result in pool.imap_unordered(_call, tasks):
            results[index] = result
            if on_result is not None:
                on_result(index, result)
        pool.close()
    finally:
        pool.terminate()
        pool.join()
    return results
