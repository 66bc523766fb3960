"""A program written for ``concurrent.futures.ProcessPoolExecutor``, run on an Achilles cluster
by changing the import and nothing else. It uses every method of the executor and the
``concurrent.futures`` and ``asyncio`` helpers that take its futures.

    python examples/dropin_executor.py            # on the configured cluster (ACHILLES_* or .env)
    python examples/dropin_executor.py --stdlib   # the same program on ProcessPoolExecutor

Both print the same lines (tests/test_dropin_executor.py checks that).
"""

import asyncio
import sys
from concurrent.futures import ALL_COMPLETED, as_completed, wait

if "--stdlib" in sys.argv:
    from concurrent.futures import ProcessPoolExecutor
else:
    from achilles import Executor as ProcessPoolExecutor  # the one line that changes


def square(x):
    return x * x


def power(base, exp=2):
    return base ** exp


def check(x):
    if x == 3:
        raise ValueError(f"{x} is not allowed")
    return x


async def with_asyncio(executor):
    loop = asyncio.get_running_loop()
    return await asyncio.gather(*(loop.run_in_executor(executor, square, i) for i in range(5)))


def main():
    with ProcessPoolExecutor(max_workers=2) as executor:
        future = executor.submit(power, 3, exp=4)
        print("submit", future.result(timeout=60))

        done = []
        future = executor.submit(square, 9)
        future.add_done_callback(lambda f: done.append(f.result()))
        future.result(timeout=60)
        print("add_done_callback", future.done(), future.cancelled())

        futures = [executor.submit(square, i) for i in range(10)]
        print("as_completed", sorted(f.result() for f in as_completed(futures, timeout=60)))
        finished, pending = wait(futures, timeout=60, return_when=ALL_COMPLETED)
        print("wait", len(finished), len(pending))

        print("map", list(executor.map(power, range(8), timeout=60)))
        print("map two iterables", list(executor.map(power, [2, 3, 4], [10, 3, 2])))
        print("map chunksize=4", list(executor.map(square, range(10), chunksize=4)))

        failing = executor.submit(check, 3)
        print("exception", type(failing.exception(timeout=60)).__name__, failing.exception())
        try:
            list(executor.map(check, range(6)))
        except ValueError as exc:
            print("map raised", exc)

        print("asyncio", asyncio.run(with_asyncio(executor)))

    executor = ProcessPoolExecutor(2)
    futures = [executor.submit(power, 2, i) for i in range(5)]
    executor.shutdown(wait=True)
    print("shutdown", [f.result() for f in futures])
    try:
        executor.submit(square, 1)
    except RuntimeError:
        print("submit after shutdown raises RuntimeError")

    executor = ProcessPoolExecutor(2)
    executor.shutdown(wait=False, cancel_futures=True)
    print("shutdown(cancel_futures=True) done")


if __name__ == "__main__":
    main()
