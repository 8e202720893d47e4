"""GET /v1/models and /v1/models/{model} as OpenAI's API answers them, through the openai SDK."""

from __future__ import annotations

import openai
import pytest

from scheduler.http.auth import ApiKeyGuard
from tests.service_harness import MODEL, cluster, run

KEY = "sk-models-0123456789abcdef"


def test_openai_sdk_lists_and_retrieves_the_served_model() -> None:
    async def body() -> None:
        async with cluster() as h:
            client = openai.AsyncOpenAI(base_url=h.url + "/v1", api_key="unused", max_retries=0)
            listed = await client.models.list()
            assert [m.id for m in listed.data] == [MODEL]
            card = await client.models.retrieve(MODEL)
            assert card.id == MODEL and card.object == "model" and card.owned_by == "dualmap-pd"
            with pytest.raises(openai.NotFoundError) as info:
                await client.models.retrieve("no-such-model")
            err = info.value.body
            assert err["code"] == "model_not_found" and err["param"] == "model", err
            await client.close()

    run(body)


def test_model_names_with_a_slash_and_the_api_key_check() -> None:
    async def body() -> None:
        async with cluster(api_keys=ApiKeyGuard([KEY])) as h:
            async with h.client.get(h.url + f"/v1/models/{MODEL}") as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "missing_api_key"
            auth = {"Authorization": f"Bearer {KEY}"}
            async with h.client.get(h.url + "/v1/models/org/other-model", headers=auth) as r:
                answer = await r.json()
                assert r.status == 404 and answer["error"]["code"] == "model_not_found", answer
            async with h.client.get(h.url + f"/v1/models/{MODEL}", headers=auth) as r:
                assert r.status == 200 and (await r.json())["id"] == MODEL

    run(body)
