"""The API's cancel on a real PostgreSQL server, where it is one statement (a
data-modifying CTE): the cancel tests of tests/unit/test_api.py (SQLite there, where it is
two), collected again here with a PostgreSQL ``env``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from comfy_cancel.migrations import upgrade
from tests.apitest import KEY, Env, make_env
from tests.unit.test_api import (  # noqa: F401  (collected here too)
    test_a_repeated_cancel_is_200_keeps_the_first_request_and_audits_both,
    test_a_token_deleted_while_the_gate_remembers_it_cannot_cancel,
    test_cancel_before_it_is_queued_is_400,
    test_cancel_needs_a_valid_token,
    test_cancel_of_a_finished_workflow_is_400_naming_its_status,
    test_cancel_of_a_queued_or_running_workflow_is_200_and_published,
    test_cancel_of_another_accounts_or_a_malformed_id_is_404,
    test_cancel_with_the_broker_down_is_500_and_the_intent_is_kept,
    test_cancel_without_a_body_is_fine,
    test_the_cancel_request_shows_in_get,
)
from tests.unit.test_api_cross_account import (  # noqa: F401
    test_every_route_hides_another_accounts_objects,
)
from tests.unit.test_intake import (  # noqa: F401
    groups,
    test_a_group_whose_publish_fails_answers_500_to_each_and_keeps_the_requests,
    test_cancels_arriving_together_are_written_and_published_in_groups,
    test_each_request_of_a_group_is_answered_for_its_own_caller,
)


@pytest.fixture
def env(pg_database_url: str, broker: Any) -> Iterator[Env]:
    upgrade(pg_database_url)
    yield from make_env(pg_database_url, secret_key=KEY)
