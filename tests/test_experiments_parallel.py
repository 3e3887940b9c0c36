"""minilm.experiments.parallel: jobs in single-threaded worker processes, same results as in-process."""
import math
import multiprocessing
import os

import numpy as np
import pytest

from minilm.experiments import parallel, recall


def test_results_come_back_in_job_order_and_each_is_reported_once():
    seen = []
    results = parallel.run_jobs(math.sqrt, [16.0, 1.0, 9.0, 4.0], workers=2,
                                on_result=lambda i, r: seen.append((i, r)))
    assert results == [4.0, 1.0, 3.0, 2.0]
    assert sorted(seen) == [(0, 4.0), (1, 1.0), (2, 3.0), (3, 2.0)]
    assert not multiprocessing.active_children()


def test_workers_are_single_threaded_and_the_parent_environment_is_restored():
    before = {name: os.environ.get(name) for name in parallel.THREAD_VARIABLES}
    values = parallel.run_jobs(os.getenv, list(parallel.THREAD_VARIABLES), workers=2)
    assert values == ["1"] * len(parallel.THREAD_VARIABLES)
    assert {name: os.environ.get(name) for name in parallel.THREAD_VARIABLES} == before


def test_one_worker_runs_in_this_process():
    pid = parallel.run_jobs(lambda _: os.getpid(), [None, None], workers=1)   # a lambda cannot be pickled
    assert pid == [os.getpid()] * 2


def test_an_error_in_a_job_propagates_and_stops_the_workers():
    with pytest.raises(ValueError):
        parallel.run_jobs(math.sqrt, [4.0, -1.0, 9.0], workers=2)
    assert not multiprocessing.active_children()


def test_default_workers_is_between_one_and_the_limit():
    assert 1 <= parallel.default_workers() <= 2
    assert parallel.default_workers(limit=1) == 1


def test_a_recall_run_gives_the_same_result_in_a_worker_as_in_this_process():
    study = {"task": "mqar", "seq_len": 16, "eval_lens": (16,), "kv_pairs": (2,), "width": 16,
             "schedules": ("MA",), "lrs": (3e-3,)}
    job = (study, "MA", 16, 3e-3, 3, None)
    here, = parallel.run_jobs(recall._train_job, [job], workers=1)
    there, _ = parallel.run_jobs(recall._train_job, [job, job], workers=2)
    assert here["steps"] == there["steps"] == 3
    np.testing.assert_allclose(here["losses"], there["losses"], rtol=1e-4)
    assert here["accuracy"] == there["accuracy"]
