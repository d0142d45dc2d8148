"""Batched per-sample LoRA gradients against the batch-size-1 loop, on the tiny model."""

import pytest
import torch

from gs_ray.config import load_config
from gs_ray.data.batches import IGNORE_INDEX, pad_batch
from gs_ray.data.prepare import end_of_turn_ids
from gs_ray.gradientspace.grads import (
    PerSampleGradients,
    batched_backward,
    gradient_block,
    gradient_blocks,
    reference_gradients,
    select_target_tokens,
)
from gs_ray.modeling.models import attach_lora, load_base_model, load_tokenizer, lora_parameters, save_adapter

# Lengths differ so every row but one is padded; prompts of different length too.
LENGTHS = [(5, 9), (12, 3), (2, 20), (30, 1), (7, 7)]


def _rows(lengths, vocab=1024, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for prompt, reply in lengths:
        ids = torch.randint(3, vocab, (prompt + reply,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def _trained_lora(targets, seed=0):
    """A LoRA with nonzero B (as after warm-up), so A's gradients are not all zero."""
    cfg = load_config("tiny", [f"lora.target_modules={targets}"])
    torch.manual_seed(seed)
    model = attach_lora(load_base_model(cfg.model), cfg.lora)
    with torch.no_grad():
        for _, param in lora_parameters(model):
            param.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]])
def test_batched_equals_loop_with_padding_and_several_modules(targets):
    model = _trained_lora(targets)
    batch = pad_batch(_rows(LENGTHS), pad_token_id=0)
    per_sample = PerSampleGradients(model)
    batched = per_sample(batch)
    loop = reference_gradients(model, batch)
    assert batched.shape == (len(LENGTHS), per_sample.dim)
    assert per_sample.dim == sum(p.numel() for _, p in lora_parameters(model))
    assert loop.abs().max() > 0 and (loop.norm(dim=1) > 0).all()
    torch.testing.assert_close(batched, loop, rtol=1e-4, atol=1e-6)


def test_rows_sum_to_the_plain_batched_gradient():
    model = _trained_lora(["q_proj", "v_proj"])
    batch = pad_batch(_rows(LENGTHS, seed=1), pad_token_id=0)
    summed = torch.cat([g.flatten() for g in batched_backward(model, batch)])
    torch.testing.assert_close(PerSampleGradients(model)(batch).sum(dim=0), summed, rtol=1e-4, atol=1e-6)


def test_a_sample_gradient_does_not_depend_on_its_batch():
    model = _trained_lora(["q_proj", "v_proj"])
    rows = _rows(LENGTHS, seed=2)
    per_sample = PerSampleGradients(model)
    together = per_sample(pad_batch(rows, pad_token_id=0))
    alone = per_sample(pad_batch(rows[2:3], pad_token_id=0))
    torch.testing.assert_close(together[2], alone[0], rtol=1e-4, atol=1e-6)


def test_untrained_lora_has_zero_a_gradients():
    """B = 0 at initialisation, so every A gradient vanishes: why warm-up comes first."""
    cfg = load_config("tiny", ["lora.target_modules=[q_proj]"])
    model = attach_lora(load_base_model(cfg.model), cfg.lora)
    grads = PerSampleGradients(model)(pad_batch(_rows(LENGTHS[:2]), pad_token_id=0))
    offset = 0
    for name, param in lora_parameters(model):
        block = grads[:, offset : offset + param.numel()]
        assert (block.abs().max() == 0) == ("lora_A" in name), name
        offset += param.numel()


def test_model_without_lora_is_refused():
    cfg = load_config("tiny")
    with pytest.raises(ValueError, match="no LoRA parameters"):
        PerSampleGradients(load_base_model(cfg.model))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]])
def test_gradient_blocks_read_from_the_saved_adapter_follow_the_gradient_rows(targets, tmp_path):
    model = _trained_lora(targets)
    save_adapter(model, tmp_path / "adapter")
    expected, start = {}, 0
    for name, param in lora_parameters(model):  # the row layout PerSampleGradients documents
        expected.setdefault(gradient_block(name), []).append((start, start + param.numel()))
        start += param.numel()
    assert gradient_blocks(tmp_path / "adapter") == expected
    assert set(expected) == {f"{module}.lora_{matrix}" for module in targets for matrix in "AB"}
    with pytest.raises(ValueError, match="not a LoRA A or B weight"):
        gradient_block("model.layers.0.self_attn.q_proj.weight")


# ---------------------------------------------------------------- which target tokens count


END = [7, 8]


def _row(prompt: list[int], reply: list[int]) -> dict:
    return {"input_ids": prompt + reply, "labels": [IGNORE_INDEX] * len(prompt) + reply}


def test_end_tokens_keep_only_the_end_of_turn_and_complete_a_truncated_reply():
    whole = select_target_tokens(_row([1, 2], [3, 4, *END]), "end", END)
    assert whole["input_ids"] == [1, 2, 3, 4, 7, 8]
    assert whole["labels"] == [IGNORE_INDEX] * 4 + END
    truncated = select_target_tokens(_row([1, 2], [3, 4]), "end", END)  # cut before its end of turn
    assert truncated["input_ids"] == [1, 2, 3, 4, 7, 8] and truncated["labels"] == [IGNORE_INDEX] * 4 + END


def test_answer_tokens_drop_the_end_of_turn_and_all_keeps_the_row():
    row = _row([1], [3, 4, *END])
    assert select_target_tokens(row, "answer", END)["labels"] == [IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX]
    assert select_target_tokens(row, "all", END) is row
    only_end = _row([1], END)  # nothing but the end of turn: keep it rather than leave no target
    assert select_target_tokens(only_end, "answer", END)["labels"] == only_end["labels"]


def test_end_of_turn_of_the_chat_template():
    tokenizer = load_tokenizer(load_config("tiny").model)
    assert tokenizer.decode(end_of_turn_ids(tokenizer)) == "<|im_end|>\n"


def test_end_token_gradient_matches_the_loop_on_those_tokens():
    """The selection only moves labels, so the batched gradient still equals the one-sample loop on them."""
    model = _trained_lora(["q_proj", "v_proj"])
    rows = [_row([5, 6, 9], [10, 11, *END]), _row([5], [12, *END]), _row([9, 9], [13, 14, 15])]
    batch = pad_batch([select_target_tokens(row, "end", END) for row in rows], 0)
    gradients = PerSampleGradients(model)(batch)
    torch.testing.assert_close(gradients, reference_gradients(model, batch), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(gradients, PerSampleGradients(model)(pad_batch(rows[:2] + rows[2:], 0)))


def test_a_lora_linear_called_twice_per_forward_gets_the_sum_of_both_calls():
    """Layer 1 is layer 0 (shared weights, as in ALBERT-style models): each of its LoRA linears runs twice."""
    cfg = load_config("tiny", ["lora.target_modules=[q_proj,v_proj,down_proj]"])
    base = load_base_model(cfg.model)
    base.model.layers[1] = base.model.layers[0]
    torch.manual_seed(0)
    model = attach_lora(base, cfg.lora)
    with torch.no_grad():
        for _, param in lora_parameters(model):
            param.normal_(0, 0.05)
    batch = pad_batch(_rows(LENGTHS, seed=3), pad_token_id=0)
    loop = reference_gradients(model, batch)
    assert loop.abs().max() > 0
    torch.testing.assert_close(PerSampleGradients(model)(batch), loop, rtol=1e-4, atol=1e-6)


def test_embedding_lora_is_refused_when_attached_naming_the_module():
    from gs_ray.core.errors import ModelError

    cfg = load_config("tiny", ["lora.target_modules=[q_proj,embed_tokens]"])
    with pytest.raises(ModelError, match=r"lora.target_modules: 'embed_tokens' adapts model.embed_tokens "
                                         r"\(Embedding\), not a linear layer.*linear layers only"):
        attach_lora(load_base_model(cfg.model), cfg.lora)


def test_per_sample_gradients_refuse_an_adapter_with_embedding_lora():
    """An adapter made elsewhere (not by attach_lora) with lora_embedding_A/B: refused, never left out silently."""
    from peft import LoraConfig, get_peft_model

    cfg = load_config("tiny")
    model = get_peft_model(load_base_model(cfg.model), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(ValueError, match=r"model.model.embed_tokens has LoRA weights \(lora_embedding_A\)"):
        PerSampleGradients(model)
