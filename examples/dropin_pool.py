"""A program written for ``multiprocessing.Pool``, run on an Achilles cluster by changing the
import and nothing else. It uses every public method of the Pool.

    python examples/dropin_pool.py            # on the configured cluster (ACHILLES_* or .env)
    python examples/dropin_pool.py --stdlib   # the same program on multiprocessing.Pool

Both print the same lines (tests/test_dropin_pool.py checks that).
"""

import sys

if "--stdlib" in sys.argv:
    from multiprocessing import Pool
else:
    from achilles import Pool  # the one line that changes


def square(x):
    return x * x


def power(base, exp):
    return base ** exp


def describe(name, count=1):
    return f"{count} x {name}"


def check(x):
    if x == 3:
        raise ValueError(f"{x} is not allowed")
    return x


def main():
    with Pool(2) as pool:
        print("apply", pool.apply(describe, ("apple",), {"count": 3}))

        done = []
        result = pool.apply_async(square, (12,), callback=done.append)
        print("apply_async", result.get(timeout=60), result.ready(), result.successful(), done)

        print("map", pool.map(square, range(10)))
        print("map chunksize=3", pool.map(square, range(10), chunksize=3))
        print("map_async", pool.map_async(square, range(5), callback=done.append).get(60), done)
        print("starmap", pool.starmap(power, [(2, 5), (3, 3)]))
        print("starmap_async", pool.starmap_async(power, [(10, 2), (2, 10)]).get(60))
        print("imap", list(pool.imap(square, range(8))))
        iterator = pool.imap(square, range(3))
        print("imap next", iterator.next(timeout=60), next(iterator), next(iterator))
        print("imap_unordered", sorted(pool.imap_unordered(square, range(8), chunksize=2)))

        errors = []
        result = pool.apply_async(check, (3,), error_callback=errors.append)
        result.wait(60)
        print("error_callback", type(errors[0]).__name__, errors[0], result.successful())
        try:
            pool.map(check, range(6))
        except ValueError as exc:
            print("map raised", exc)

    pool = Pool(2)
    pending = [pool.apply_async(power, (2, i)) for i in range(5)]
    pool.close()
    pool.join()
    print("close/join", [r.get() for r in pending])
    try:
        pool.apply(square, (1,))
    except ValueError:
        print("closed pool raises ValueError")

    pool = Pool(2)
    pool.terminate()
    pool.join()
    print("terminate/join done")


if __name__ == "__main__":
    main()
