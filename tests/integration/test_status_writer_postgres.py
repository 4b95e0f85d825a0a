"""The one status writer on a real PostgreSQL server: the unit tests of
tests/unit/test_status_writer.py (SQLite there), collected again here with a PostgreSQL
``db``. Row locks and concurrent compare-and-sets behave differently on the two."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from comfy_cancel.db import Database
from testbed.database import migrated
from tests.unit.test_status_writer import (  # noqa: F401  (collected here too)
    test_a_callers_request_is_recorded_and_audited_as_request_cancel_many_does,
    test_a_callers_request_needs_the_account_and_a_valid_token_of_it,
    test_a_callers_request_on_a_workflow_that_cannot_be_cancelled_writes_nothing,
    test_a_cancel_of_a_completed_workflow_changes_nothing_and_records_too_late,
    test_a_committed_queued_cancel_fills_a_missing_request_and_names_each_requester,
    test_a_group_of_callers_requests_records_each_as_its_caller_may,
    test_a_repeated_callers_request_keeps_the_first_and_is_audited_and_stamped_again,
    test_cancel_queued_many_changes_only_queued_rows_and_audits_each,
    test_every_transition_is_allowed_or_refused_by_the_lifecycle,
    test_nothing_moves_to_accepted_and_forbidden_sources_are_a_programming_error,
    test_request_cancel_many_records_open_requests_once_and_audits_each,
    test_two_writers_racing_on_one_row_leave_exactly_one_winner,
)


@pytest.fixture
def db(pg_database_url: str) -> Iterator[Database]:
    database = migrated(pg_database_url)
    yield database
    database.engine.dispose()
