"""What the tests and the benchmark share, outside the installed package: a real
PostgreSQL server (:mod:`testbed.postgres`), the whole system in processes
(:mod:`testbed.stack`), and the CI preflight (:mod:`testbed.preflight`)."""
