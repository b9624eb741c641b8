"""The Responses API through the openai SDK: a chain of responses is a session's turns (equal to the gRPC path),
retrieve, input items, delete -> 404, streamed typed events, store: false keeps nothing."""

from __future__ import annotations

import openai
import pytest

from rwkv_serve_client import RWKVClient
from tests.test_gateway_support import MODEL, start_gateway

pytestmark = pytest.mark.usefixtures("one_thread")
SYSTEM = "You are a test."


def _grpc_conversation(service, turns: list[str], max_tokens: int) -> list[str]:
    with RWKVClient(service.target) as rwkv:
        session = rwkv.create_session(MODEL, system_prompt=SYSTEM, temperature=0, max_tokens=max_tokens)
        return [rwkv.say(session.session_id, text).text for text in turns]


def test_a_chain_of_responses_is_the_grpc_conversation(oai: openai.OpenAI, service) -> None:
    first = oai.responses.create(model=MODEL, input="Hello!", instructions=SYSTEM, temperature=0,
                                 max_output_tokens=8)
    second = oai.responses.create(model=MODEL, input="Tell me more.", previous_response_id=first.id,
                                  temperature=0, max_output_tokens=8)
    third = oai.responses.create(model=MODEL, input=[{"role": "user", "content": "And then?"}],
                                 previous_response_id=second.id, temperature=0, max_output_tokens=8)
    expected = _grpc_conversation(service, ["Hello!", "Tell me more.", "And then?"], 8)
    assert [first.output_text, second.output_text, third.output_text] == expected
    assert first.object == "response" and first.id.startswith("resp_") and first.status == "incomplete"
    assert first.incomplete_details.reason == "max_output_tokens" and first.usage.output_tokens == 8
    assert second.previous_response_id == first.id and first.instructions == SYSTEM
    assert first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens


def test_retrieve_input_items_and_delete(oai: openai.OpenAI) -> None:
    made = oai.responses.create(model=MODEL, input="Remember me.", instructions=SYSTEM, temperature=0,
                                max_output_tokens=6, metadata={"case": "retrieve"})
    got = oai.responses.retrieve(made.id)
    assert got.id == made.id and got.output_text == made.output_text and got.metadata == {"case": "retrieve"}
    assert got.usage.output_tokens == made.usage.output_tokens and got.model == MODEL
    items = oai.responses.input_items.list(made.id)
    assert [(i.role, i.content[0].text) for i in items.data] == [("user", "Remember me.")]
    deleted = oai.responses.delete(made.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError) as gone:
        oai.responses.retrieve(made.id)
    assert gone.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model=MODEL, input="Again?", previous_response_id=made.id)


def test_streamed_response_events(oai: openai.OpenAI) -> None:
    whole = oai.responses.create(model=MODEL, input="Stream this.", instructions=SYSTEM, temperature=0,
                                 max_output_tokens=8, store=False)
    events = list(oai.responses.create(model=MODEL, input="Stream this.", instructions=SYSTEM, temperature=0,
                                       max_output_tokens=8, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    stored = oai.responses.retrieve(events[0].response.id)  # the streamed one was stored (store defaults to true)
    assert stored.output_text == deltas


def test_store_false_keeps_nothing(oai: openai.OpenAI, service) -> None:
    kept = oai.responses.create(model=MODEL, input="Hello!", instructions=SYSTEM, temperature=0,
                                max_output_tokens=8)
    ephemeral = oai.responses.create(model=MODEL, input="Tell me more.", previous_response_id=kept.id,
                                     temperature=0, max_output_tokens=8, store=False)
    assert ephemeral.output_text == _grpc_conversation(service, ["Hello!", "Tell me more."], 8)[1]
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(ephemeral.id)
    # the conversation did not move: continuing from the kept response is still its next turn
    again = oai.responses.create(model=MODEL, input="Tell me more.", previous_response_id=kept.id,
                                 temperature=0, max_output_tokens=8)
    assert again.output_text == ephemeral.output_text
    stateless = oai.responses.create(model=MODEL, input="Hello!", instructions=SYSTEM, temperature=0,
                                     max_output_tokens=8, store=False)
    assert stateless.output_text == kept.output_text



def test_continuing_from_an_earlier_response_branches(oai: openai.OpenAI, service) -> None:
    first = oai.responses.create(model=MODEL, input="Hello!", instructions=SYSTEM, temperature=0,
                                 max_output_tokens=8)
    main = oai.responses.create(model=MODEL, input="Tell me more.", previous_response_id=first.id, temperature=0,
                                max_output_tokens=8)
    branch = oai.responses.create(model=MODEL, input="Something else.", previous_response_id=first.id,
                                  temperature=0, max_output_tokens=8)
    on_branch = oai.responses.create(model=MODEL, input="And then?", previous_response_id=branch.id,
                                     temperature=0, max_output_tokens=8)
    after_main = oai.responses.create(model=MODEL, input="And then?", previous_response_id=main.id,
                                      temperature=0, max_output_tokens=8)
    assert main.output_text == _grpc_conversation(service, ["Hello!", "Tell me more."], 8)[1]
    assert [branch.output_text, on_branch.output_text] == \
        _grpc_conversation(service, ["Hello!", "Something else.", "And then?"], 8)[1:]
    assert after_main.output_text == _grpc_conversation(service, ["Hello!", "Tell me more.", "And then?"], 8)[2]
    assert oai.responses.retrieve(branch.id).previous_response_id == first.id


def test_a_response_older_than_the_kept_versions_is_404_evicted(service) -> None:
    gateway = start_gateway(service, responses_keep_versions=1)
    try:
        with openai.OpenAI(base_url=gateway.url, api_key="dev", max_retries=0) as oai:
            chain = [oai.responses.create(model=MODEL, input="Start.", instructions=SYSTEM, temperature=0,
                                          max_output_tokens=3)]
            for i in range(3):
                chain.append(oai.responses.create(model=MODEL, input=f"Turn {i}.", previous_response_id=chain[-1].id,
                                                  temperature=0, max_output_tokens=3))
            # versions 1..4 exist; the session keeps its current one (4) and 1 earlier (3)
            kept = oai.responses.create(model=MODEL, input="Branch.", previous_response_id=chain[2].id,
                                        temperature=0, max_output_tokens=3)
            assert kept.output_text
            with pytest.raises(openai.NotFoundError) as evicted:
                oai.responses.create(model=MODEL, input="Too old.", previous_response_id=chain[0].id,
                                     temperature=0, max_output_tokens=3)
            assert evicted.value.body["code"] == "state_evicted" and "evicted" in evicted.value.message
            assert oai.responses.retrieve(chain[0].id).output_text == chain[0].output_text  # its metadata stays
    finally:
        gateway.close()


def test_text_format_and_repeated_instructions(oai: openai.OpenAI) -> None:
    import json

    first = oai.responses.create(model=MODEL, input="Give me JSON.", instructions=SYSTEM, temperature=1.0,
                                 max_output_tokens=40, text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(first.output_text), dict) and first.text.format.type == "json_object"
    # clients that resend the same instructions on every call: accepted, nothing changes
    again = oai.responses.create(model=MODEL, input="More.", instructions=SYSTEM, previous_response_id=first.id,
                                 temperature=0, max_output_tokens=4)
    assert again.previous_response_id == first.id
    with pytest.raises(openai.BadRequestError) as other:
        oai.responses.create(model=MODEL, input="More.", instructions="Other rules.", previous_response_id=first.id)
    assert other.value.body["param"] == "instructions"
