"""What the tests and the benchmark share, outside the installed package: a real
PostgreSQL server (:mod:`testbed.postgres`), migrated databases (:mod:`testbed.database`),
the whole system in processes (:mod:`testbed.stack`), and the CI preflight
(:mod:`testbed.preflight`)."""
