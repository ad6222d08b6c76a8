"""MaskedDiffusionLMPipeline with a tokenizer trained on Python's documentation and a tiny random BERT: generation,
prompts, infilling, caching, determinism, save / load, and clear errors."""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

import diffusers_ext
from diffusers_ext.pipelines import MaskedDiffusionLMPipeline
from diffusers_ext.schedulers import MaskedDiffusionScheduler
from diffusers_ext.training.text_data import pydoc_paragraphs, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(pydoc_paragraphs()[:400], vocab_size=400)


def tiny_bert(vocab_size: int) -> BertForMaskedLM:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return BertForMaskedLM(config).eval()


def make_pipeline(tokenizer, **scheduler_kwargs) -> MaskedDiffusionLMPipeline:
    scheduler = MaskedDiffusionScheduler(mask_token_id=tokenizer.mask_token_id, **scheduler_kwargs)
    pipe = MaskedDiffusionLMPipeline(tokenizer=tokenizer, model=tiny_bert(len(tokenizer)), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_exported_from_the_package():
    assert diffusers_ext.MaskedDiffusionLMPipeline is MaskedDiffusionLMPipeline


@pytest.mark.parametrize("sampler", ["ancestral", "first_hitting", "parallel"])
def test_unconditional_generation_fills_every_position(tokenizer, sampler):
    pipe = make_pipeline(tokenizer, sampler=sampler)
    steps = 50 if sampler == "ancestral" else None
    output = pipe(num_sequences_per_prompt=3, sequence_length=16, num_inference_steps=steps, generator=seeded())
    assert output.token_ids.shape == (3, 16) and (output.token_ids != tokenizer.mask_token_id).all()
    assert len(output.texts) == 3 and all(isinstance(text, str) and text for text in output.texts)
    if sampler == "first_hitting":
        assert output.num_model_calls == 16  # one reveal per step, one call per step


def test_prompt_is_kept_and_same_seed_gives_the_same_text(tokenizer):
    pipe = make_pipeline(tokenizer, sampler="first_hitting")
    prompt = "The for statement"
    prefix = tokenizer(prompt, add_special_tokens=False).input_ids
    first = pipe(prompt=[prompt, "A class"], num_sequences_per_prompt=2, sequence_length=12, generator=seeded())
    assert first.token_ids.shape == (4, 12)
    assert first.token_ids[:2, : len(prefix)].tolist() == [prefix, prefix]
    again = pipe(prompt=[prompt, "A class"], num_sequences_per_prompt=2, sequence_length=12, generator=seeded())
    assert first.texts == again.texts
    assert pipe(prompt=prompt, sequence_length=12, generator=seeded(1)).texts[0].startswith(prompt)


def test_infill_keeps_the_given_spans(tokenizer):
    pipe = make_pipeline(tokenizer, sampler="parallel", unmasking_order="confidence")
    template = f"The{tokenizer.mask_token}{tokenizer.mask_token} statement is used{tokenizer.mask_token}"
    ids = tokenizer(template, add_special_tokens=False).input_ids
    output = pipe(infill=template, generator=seeded())
    kept = [i for i, token in enumerate(ids) if token != tokenizer.mask_token_id]
    assert [output.token_ids[0, i].item() for i in kept] == [ids[i] for i in kept]
    assert (output.token_ids != tokenizer.mask_token_id).all() and output.num_model_calls == 3


def test_caching_reuses_logits_without_changing_the_output(tokenizer):
    pipe = make_pipeline(tokenizer)
    cached = pipe(sequence_length=8, num_inference_steps=200, generator=seeded(), output_type="ids")
    plain = pipe(sequence_length=8, num_inference_steps=200, generator=seeded(), output_type="ids",
                 cache_model_output=False)
    assert torch.equal(cached.token_ids, plain.token_ids) and cached.texts is None
    assert plain.num_model_calls == 200 and cached.num_model_calls <= 9


def test_save_and_load_round_trip(tokenizer, tmp_path):
    pipe = make_pipeline(tokenizer, sampler="first_hitting", block_length=4)
    expected = pipe(sequence_length=10, generator=seeded()).texts
    pipe.save_pretrained(tmp_path)
    loaded = MaskedDiffusionLMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is MaskedDiffusionScheduler and loaded.scheduler.config.block_length == 4
    assert loaded(sequence_length=10, generator=seeded()).texts == expected


def test_shared_on_the_hub_layout_loads_through_stock_diffusers(tokenizer, tmp_path):
    from diffusers import DiffusionPipeline

    from diffusers_ext.hub import save_for_hub

    pipe = make_pipeline(tokenizer, sampler="parallel", unmasking_order="entropy")
    expected = pipe(sequence_length=10, generator=seeded()).texts
    save_for_hub(pipe, tmp_path, repo_id="me/tiny-text", pipeline_tag="text-generation")
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is MaskedDiffusionLMPipeline
    assert loaded(sequence_length=10, generator=seeded()).texts == expected
    assert "text-generation" in (tmp_path / "README.md").read_text()


def test_callback_sees_every_step(tokenizer):
    pipe = make_pipeline(tokenizer, sampler="first_hitting")
    seen = []

    def callback(pipeline, i, t, tensors):
        seen.append(int((tensors["tokens"] == tokenizer.mask_token_id).sum()))
        return tensors

    pipe(sequence_length=6, callback_on_step_end=callback, generator=seeded())
    assert seen == [5, 4, 3, 2, 1, 0]


def test_bad_inputs_give_clear_errors(tokenizer):
    pipe = make_pipeline(tokenizer, sampler="first_hitting")
    with pytest.raises(ValueError, match="leaves nothing to generate"):
        pipe(prompt="The for statement is used to iterate over the elements", sequence_length=4)
    with pytest.raises(ValueError, match="no '\\[MASK\\]' to fill"):
        pipe(infill="nothing to fill here")
    with pytest.raises(ValueError, match="not both"):
        pipe(prompt="a", infill=f"a{tokenizer.mask_token}")
    with pytest.raises(ValueError, match="temperature"):
        pipe(temperature=0)
    small = MaskedDiffusionLMPipeline(tokenizer=tokenizer, model=tiny_bert(100), scheduler=pipe.scheduler)
    with pytest.raises(ValueError, match="vocabulary"):
        small(sequence_length=4)
    other = MaskedDiffusionLMPipeline(tokenizer=tokenizer, model=pipe.model,
                                      scheduler=MaskedDiffusionScheduler(mask_token_id=0))
    with pytest.raises(ValueError, match="mask_token_id"):
        other(sequence_length=4)
    no_mask = train_tokenizer(pydoc_paragraphs()[:50], vocab_size=300)
    no_mask.mask_token = None
    without = MaskedDiffusionLMPipeline(tokenizer=no_mask, model=pipe.model, scheduler=pipe.scheduler)
    with pytest.raises(ValueError, match="no mask token"):
        without(sequence_length=4)


class EmbeddingLogits(torch.nn.Module):
    """A plain torch module (no ``config``, no ``device``) returning logits as a tensor."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.table = torch.nn.Embedding(vocab_size, vocab_size)

    def forward(self, input_ids):
        return self.table(input_ids)


def test_a_plain_torch_module_serves_as_the_model(tokenizer):
    torch.manual_seed(0)
    scheduler = MaskedDiffusionScheduler(mask_token_id=tokenizer.mask_token_id, sampler="first_hitting")
    pipe = MaskedDiffusionLMPipeline(tokenizer=tokenizer, model=EmbeddingLogits(len(tokenizer)), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    output = pipe(num_sequences_per_prompt=2, sequence_length=8, generator=seeded())
    assert output.token_ids.shape == (2, 8) and (output.token_ids != tokenizer.mask_token_id).all()
    assert output.num_model_calls == 8 and pipe(num_sequences_per_prompt=2, sequence_length=8,
                                                 generator=seeded()).texts == output.texts


def test_length_and_step_errors_come_before_any_model_call(tokenizer):
    pipe = make_pipeline(tokenizer, sampler="first_hitting")
    calls = []
    pipe.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    with pytest.raises(ValueError, match="sequence_length is 200 tokens, more than the model's 64 positions"):
        pipe(sequence_length=200)
    template = "The" + tokenizer.mask_token * 70
    with pytest.raises(ValueError, match="infill template has 71 tokens, more than the model's 64 positions"):
        pipe(infill=template)
    with pytest.raises(ValueError, match="6 masked tokens need num_inference_steps >= 6, got 3"):
        pipe(sequence_length=6, num_inference_steps=3)
    assert calls == []


def test_a_callback_that_edits_the_tokens_invalidates_the_cache(tokenizer):
    """Edit (copy) the tokens after a step that revealed nothing: the next step must call the model again, one call
    more than the same seeded run without the edit."""
    pipe = make_pipeline(tokenizer)
    calls = []
    pipe.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    revealed = []

    def record(pipeline, i, t, tensors):
        revealed.append(int((tensors["tokens"] != tokenizer.mask_token_id).sum()))
        return tensors

    pipe(sequence_length=4, num_inference_steps=200, generator=seeded(), callback_on_step_end=record)
    baseline = len(calls)
    quiet = next(i for i in range(1, 199) if revealed[i] == revealed[i - 1])  # step i revealed nothing

    def edit(pipeline, i, t, tensors):
        return {"tokens": tensors["tokens"].clone()} if i == quiet else tensors

    calls.clear()
    pipe(sequence_length=4, num_inference_steps=200, generator=seeded(), callback_on_step_end=edit)
    assert baseline <= 5 and len(calls) == baseline + 1
