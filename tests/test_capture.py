"""The capture on the default model: the states it gives are the states llama.cpp computes."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from guardrail.errors import CaptureError, ContextOverflowError
from guardrail.runtime.capture import RESULT_NORM, layer_name
from guardrail.runtime.chat import ChatFormat
from guardrail.runtime.engine import Context, Entry, Sampler, generate, prefill

PROMPT = [{"role": "user", "content": "Write two sentences about the history of tea in China."}]


def _prompt(model):
    return ChatFormat(model).tokens(PROMPT).ids


def test_result_norm_equals_llama_get_embeddings_ith(model):
    tokens = _prompt(model)
    with Context(model, n_ctx=256, hooks=(RESULT_NORM,), embeddings=True) as ctx:
        result = ctx.decode([Entry(t, i, (0,), True) for i, t in enumerate(tokens)])
        rows = result.states.rows[RESULT_NORM]
        assert rows.shape == (len(tokens), model.info.n_embd)
        expected = np.stack([ctx.embedding(i) for i in range(len(tokens))])
    np.testing.assert_allclose(rows, expected, rtol=0, atol=1e-6)


def test_middle_layer_batch_equals_one_token_at_a_time(model):
    tokens = _prompt(model)
    name = layer_name(model.info.n_layer // 2)
    with Context(model, n_ctx=256, hooks=(name,)) as ctx:
        batched = ctx.decode([Entry(t, i, (0,), i == len(tokens) - 1) for i, t in enumerate(tokens)])
        one_batch = batched.states.rows[name].copy()
        ctx.clear()
        single = [ctx.decode([Entry(t, i, (0,), True)]).states.rows[name][0].copy()
                  for i, t in enumerate(tokens)]
    single = np.stack(single)
    cosine = np.sum(one_batch * single, 1) / (np.linalg.norm(one_batch, axis=1) * np.linalg.norm(single, axis=1))
    assert cosine.min() > 0.999
    np.testing.assert_allclose(one_batch, single, rtol=0, atol=0.05 * np.abs(single).max())


def test_micro_batches_are_stitched_in_batch_order(model):
    tokens = _prompt(model)
    name = layer_name(5)
    with Context(model, n_ctx=256, n_batch=128, hooks=(name,)) as whole:
        expected = whole.decode([Entry(t, i, (0,), False) for i, t in enumerate(tokens)]).states.rows[name].copy()
    with Context(model, n_ctx=256, n_batch=128, n_ubatch=8, hooks=(name,)) as split:
        got = split.decode([Entry(t, i, (0,), False) for i, t in enumerate(tokens)]).states
    assert got.rows[name].shape == expected.shape
    np.testing.assert_allclose(got.rows[name], expected, rtol=0, atol=1e-3 * np.abs(expected).max())
    assert list(got.token_index[name]) == list(range(len(tokens)))


def test_last_layer_holds_only_output_tokens_and_says_so(model):
    tokens = _prompt(model)
    last, mid = layer_name(model.info.n_layer - 1), layer_name(3)
    outputs = {2, 7, len(tokens) - 1}
    with Context(model, n_ctx=256, hooks=(last, mid, RESULT_NORM)) as ctx:
        states = ctx.decode([Entry(t, i, (0,), i in outputs) for i, t in enumerate(tokens)]).states
        assert list(states.token_index[last]) == sorted(outputs)
        assert list(states.token_index[RESULT_NORM]) == sorted(outputs)
        assert len(states.token_index[mid]) == len(tokens)
        assert np.array_equal(states.of(last, 7), states.rows[last][1])
        with pytest.raises(KeyError):
            states.of(last, 3)


def test_greedy_generation_with_capture_matches_plain_llama(model, model_path):
    tokens = _prompt(model)
    n = 40
    with Context(model, n_ctx=512, hooks=(layer_name(10), layer_name(20), RESULT_NORM)) as ctx:
        ours = [s.token for s in generate(ctx, tokens, Sampler(model), max_tokens=n)]
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=512, verbose=False)
    theirs = []
    for token in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0):
        theirs.append(token)
        if llm.token_eos() == token or len(theirs) == n:
            break
    assert len(ours) > 5
    assert ours == theirs[: len(ours)]


def test_every_generated_token_carries_its_states(model):
    name = layer_name(20)
    with Context(model, n_ctx=512, hooks=(name,)) as ctx:
        steps = list(generate(ctx, _prompt(model), Sampler(model), max_tokens=12))
    for step in steps:
        if not step.eog:
            assert step.states[name].shape == (model.info.n_embd,)
            assert np.isfinite(step.states[name]).all()
    assert [s.pos for s in steps] == list(range(steps[0].pos, steps[0].pos + len(steps)))


def test_hooks_that_do_not_exist_are_refused(model):
    with pytest.raises(CaptureError, match="layers 0..29"):
        Context(model, hooks=("l_out-30",))
    with pytest.raises(CaptureError, match="unknown hook"):
        Context(model, hooks=("attn_out-3",))


def test_prefill_reports_each_chunk_and_refuses_a_prompt_past_the_context(model):
    tokens = _prompt(model)
    seen = []
    with Context(model, n_ctx=256, n_batch=16, hooks=(layer_name(4),)) as ctx:
        prefill(ctx, tokens, on_chunk=lambda off, r: seen.append((off, len(r.states.rows[layer_name(4)]))))
        assert [off for off, _ in seen] == list(range(0, len(tokens), 16))
        assert sum(n for _, n in seen) == len(tokens)
        ctx.clear()
        too_long = (tokens * (ctx.n_ctx // len(tokens) + 1))[: ctx.n_ctx + 1]
        with pytest.raises(ContextOverflowError, match="context holds"):
            prefill(ctx, too_long)
        assert ctx.seq_pos_max(0) == -1  # refused before anything was decoded


@pytest.fixture(scope="session")
def gemma(gemma_path):
    from guardrail.runtime.engine import Model

    loaded = Model(gemma_path)
    yield loaded
    loaded.close()


def test_second_architecture_gemma3_names_its_layers_and_is_captured(gemma):
    assert gemma.info.architecture == "gemma3" and gemma.info.chat_template is None
    prompt = ChatFormat(gemma).tokens(PROMPT)  # the built-in Gemma turn markers, with BOS
    assert prompt.ids[0] == gemma.bos
    hooks = (layer_name(0), layer_name(gemma.info.n_layer // 2), RESULT_NORM)
    with Context(gemma, n_ctx=256, hooks=hooks, embeddings=True) as ctx:
        result = prefill(ctx, prompt.ids)
        assert result.states.rows[hooks[1]].shape == (len(prompt), gemma.info.n_embd)
        np.testing.assert_allclose(result.states.of(RESULT_NORM, len(prompt) - 1),
                                   ctx.embedding(len(prompt) - 1), atol=1e-6)
