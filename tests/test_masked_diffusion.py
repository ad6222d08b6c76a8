"""MaskedDiffusionScheduler against an exact denoiser of a law over short strings: every one-token-at-a-time
sampler reproduces the law, parallel decoding and coarse ancestral steps measurably do not, RADD caching saves calls
without changing the output, and bad settings raise clear errors."""

import math

import pytest
import torch

from diffusers_ext.schedulers import MaskedDiffusionScheduler
from diffusers_ext.schedulers.scheduling_masked_diffusion import RADDLogitsCache
from diffusers_ext.testing.discrete import StringMixtureDenoiser

LENGTH, VOCAB, MASK = 6, 6, 5
NUM_SAMPLES = 20_000


@pytest.fixture(scope="module")
def oracle() -> StringMixtureDenoiser:
    generator = torch.Generator().manual_seed(0)
    strings = torch.randint(0, VOCAB - 1, (12, LENGTH), generator=generator)
    weights = torch.rand(12, generator=generator, dtype=torch.float64) + 0.2
    return StringMixtureDenoiser(strings, weights, VOCAB, MASK)


@pytest.fixture(scope="module")
def tv_bound(oracle) -> float:
    """Mean + 4 std of the total variation between exact draws of NUM_SAMPLES and the law."""
    generator = torch.Generator().manual_seed(1)
    values = torch.tensor([oracle.total_variation(oracle.strings[torch.multinomial(
        oracle.weights, NUM_SAMPLES, replacement=True, generator=generator)]) for _ in range(8)])
    return float(values.mean() + 4 * values.std())


def generate(scheduler, model, steps, seed=0, cache=False, batch=NUM_SAMPLES):
    """Sample ``batch`` sequences; with ``cache``, a sequence's logits are recomputed only after a step revealed one
    of its tokens (RADD). Returns the tokens and the denoiser calls in units of the batch."""
    tokens = torch.full((batch, LENGTH), MASK)
    scheduler.set_timesteps(steps)
    generator, denoiser = torch.Generator().manual_seed(seed), RADDLogitsCache(model, enabled=cache)
    for t in scheduler.timesteps:
        output = scheduler.step(denoiser(tokens), t, tokens, generator=generator)
        tokens = output.prev_sample
        denoiser.mark_stale(output.changed)
    return tokens, denoiser.calls


@pytest.fixture(scope="module")
def ancestral_samples(oracle):
    return generate(MaskedDiffusionScheduler(mask_token_id=MASK), oracle, 1000, seed=1, cache=True)


ONE_TOKEN_AT_A_TIME = {
    "first_hitting": dict(sampler="first_hitting"),
    "first_hitting_cosine_blocks": dict(sampler="first_hitting", noise_schedule="cosine", block_length=2),
    "parallel_random": dict(sampler="parallel", unmasking_order="random"),
    "parallel_confidence": dict(sampler="parallel", unmasking_order="confidence"),
    "parallel_margin": dict(sampler="parallel", unmasking_order="margin"),
    "parallel_entropy": dict(sampler="parallel", unmasking_order="entropy"),
}


@pytest.mark.parametrize("name", sorted(ONE_TOKEN_AT_A_TIME))
def test_one_token_per_step_reproduces_the_law_in_any_order(name, oracle, tv_bound):
    scheduler = MaskedDiffusionScheduler(mask_token_id=MASK, **ONE_TOKEN_AT_A_TIME[name])
    samples, calls = generate(scheduler, oracle, LENGTH)
    tv = oracle.total_variation(samples)
    print(f"\n{name}: TV {tv:.4f} (bound {tv_bound:.4f}), {calls} denoiser calls")
    assert (samples != MASK).all() and tv < tv_bound


def test_ancestral_converges_to_the_law_and_caching_saves_calls(oracle, tv_bound, ancestral_samples):
    scheduler = MaskedDiffusionScheduler(mask_token_id=MASK)
    coarse = generate(scheduler, oracle, 2)[0]
    assert (coarse != MASK).all() and (ancestral_samples[0] != MASK).all()
    tv = {2: oracle.total_variation(coarse), 1000: oracle.total_variation(ancestral_samples[0])}
    uncached, uncached_calls = generate(scheduler, oracle, 1000, cache=False, batch=64)
    cached, cached_calls = generate(scheduler, oracle, 1000, cache=True, batch=64)
    single_calls = [generate(scheduler, oracle, 1000, seed=seed, cache=True, batch=1)[1] for seed in range(5)]
    print(f"\nancestral: TV {tv} (bound {tv_bound:.4f}); 1000 steps: {uncached_calls} calls, with RADD caching "
          f"{cached_calls:.2f} (batch 64, {ancestral_samples[1]:.2f} for {NUM_SAMPLES}) and {single_calls} for single "
          "sequences")
    assert tv[1000] < tv_bound < tv[2]
    assert torch.equal(cached, uncached) and cached_calls <= LENGTH + 1
    assert max(single_calls) <= LENGTH + 1  # the first call, then one after each step that revealed a token


def test_parallel_decoding_of_correlated_tokens_is_not_exact(oracle, tv_bound):
    scheduler = MaskedDiffusionScheduler(mask_token_id=MASK, sampler="parallel", unmasking_order="confidence")
    samples, calls = generate(scheduler, oracle, 2)
    tv = oracle.total_variation(samples)
    print(f"\nparallel, 3 tokens per step: TV {tv:.4f} (bound {tv_bound:.4f})")
    assert calls == 2 and tv > 3 * tv_bound


def test_first_hitting_and_ancestral_agree_in_distribution(oracle, tv_bound, ancestral_samples):
    first_hitting, _ = generate(MaskedDiffusionScheduler(mask_token_id=MASK, sampler="first_hitting"), oracle, LENGTH)
    ancestral = ancestral_samples[0]
    distance = 0.5 * (oracle.law_of(first_hitting) - oracle.law_of(ancestral)).abs().sum()
    assert distance < 2 * tv_bound


def test_first_hitting_with_fewer_steps_than_masked_tokens_raises_and_more_steps_finish():
    """One token per step: 3 steps cannot reveal 6 tokens (the run used to end with 3 still masked, silently)."""
    scheduler = MaskedDiffusionScheduler(mask_token_id=MASK, sampler="first_hitting")
    tokens = torch.full((4, LENGTH), MASK)
    scheduler.set_timesteps(3)
    with pytest.raises(ValueError, match="6 masked tokens need num_inference_steps >= 6, got 3"):
        scheduler.step(torch.zeros(4, LENGTH, VOCAB), scheduler.timesteps[0], tokens)
    scheduler.set_timesteps(LENGTH + 2)
    for t in scheduler.timesteps:
        tokens = scheduler.step(torch.zeros(4, LENGTH, VOCAB), t, tokens).prev_sample
    assert (tokens != MASK).all()


@pytest.mark.parametrize("sampler", ["ancestral", "first_hitting", "parallel"])
def test_tokens_are_drawn_only_where_they_are_revealed(sampler, monkeypatch, oracle):
    """A categorical draw at every position of (B, L, V) took most of an ancestral step's time, at steps that reveal
    a token or two; only the revealed positions need one."""
    from diffusers_ext.schedulers import scheduling_masked_diffusion

    drawn = []
    draw = scheduling_masked_diffusion.gumbel_max_sample

    def counting_draw(logits, generator, dtype):
        drawn.append(logits.shape[:-1].numel())
        return draw(logits, generator, dtype)

    monkeypatch.setattr(scheduling_masked_diffusion, "gumbel_max_sample", counting_draw)
    scheduler = MaskedDiffusionScheduler(mask_token_id=MASK, sampler=sampler)
    tokens = torch.full((32, LENGTH), MASK)
    scheduler.set_timesteps(20 if sampler == "ancestral" else LENGTH)
    generator, revealed = torch.Generator().manual_seed(0), []
    for t in scheduler.timesteps:
        before = int((tokens == MASK).sum())
        tokens = scheduler.step(oracle(tokens), t, tokens, generator=generator).prev_sample
        revealed.append(before - int((tokens == MASK).sum()))
    assert drawn == revealed and sum(drawn) == 32 * LENGTH


def test_first_hitting_times_follow_the_schedule():
    """With n masked tokens the first-hitting time from t is t u^(1/n) under the log-linear schedule: its mean over
    u is t n / (n + 1)."""
    scheduler = MaskedDiffusionScheduler(mask_token_id=MASK, sampler="first_hitting")
    scheduler.set_timesteps(LENGTH)
    tokens = torch.full((50_000, LENGTH), MASK)
    logits = torch.zeros(50_000, LENGTH, VOCAB)
    times = scheduler.step(logits, scheduler.timesteps[0], tokens, generator=torch.Generator().manual_seed(0)).timestep
    assert abs(float(times.mean()) - LENGTH / (LENGTH + 1)) < 0.005


def test_add_noise_masks_the_expected_fraction():
    scheduler = MaskedDiffusionScheduler(mask_token_id=MASK, noise_schedule="cosine")
    clean = torch.zeros(20_000, 8, dtype=torch.long)
    noisy = scheduler.add_noise(clean, torch.full((20_000,), 0.5), generator=torch.Generator().manual_seed(0))
    expected = 1 - torch.cos(torch.tensor(torch.pi / 4)).item()
    assert abs(float((noisy == MASK).double().mean()) - expected) < 0.005
    assert ((noisy == MASK) | (noisy == clean)).all()


def test_config_round_trip_and_same_seed(tmp_path, oracle):
    scheduler = MaskedDiffusionScheduler(mask_token_id=MASK, sampler="parallel", unmasking_order="margin")
    scheduler.save_pretrained(tmp_path)
    loaded = MaskedDiffusionScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config) and loaded.config.unmasking_order == "margin"
    assert torch.equal(generate(scheduler, oracle, 3, batch=32)[0], generate(loaded, oracle, 3, batch=32)[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "mask_token_id"),
        (dict(mask_token_id=-1), "mask_token_id"),
        (dict(mask_token_id=MASK, sampler="euler"), "sampler"),
        (dict(mask_token_id=MASK, noise_schedule="linear"), "noise_schedule"),
        (dict(mask_token_id=MASK, unmasking_order="left"), "unmasking_order"),
        (dict(mask_token_id=MASK, sampling_precision="float16"), "sampling_precision"),
        (dict(mask_token_id=MASK, block_length=0), "block_length"),
        (dict(mask_token_id=MASK, block_length=4), "semi-autoregressive"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskedDiffusionScheduler(**kwargs)


def test_bad_calls(oracle):
    scheduler = MaskedDiffusionScheduler(mask_token_id=MASK)
    tokens = torch.full((2, LENGTH), MASK)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(oracle(tokens), 1.0, tokens)
    with pytest.raises(ValueError, match="positive integer"):
        scheduler.set_timesteps(0)
    scheduler.set_timesteps(1)
    with pytest.raises(ValueError, match="logits"):
        scheduler.step(oracle(tokens)[:, :3], 1.0, tokens)
    with pytest.raises(ValueError, match="vocabulary"):
        scheduler.step(oracle(tokens)[..., :MASK], 1.0, tokens)
    scheduler.step(oracle(tokens), 1.0, tokens)
    with pytest.raises(ValueError, match="step called"):
        scheduler.step(oracle(tokens), 0.0, tokens)


def shidoku_grids() -> torch.LongTensor:
    """All 288 valid 4 x 4 Sudoku grids (rows, columns and 2 x 2 boxes each hold 0-3), as rows of 16 tokens."""
    grids, cells = [], [0] * 16

    def fill(i):
        if i == 16:
            grids.append(list(cells))
            return
        row, col = divmod(i, 4)
        box = [4 * r + c for r in range(row // 2 * 2, row // 2 * 2 + 2) for c in range(col // 2 * 2, col // 2 * 2 + 2)]
        used = {cells[j] for j in range(i) if j // 4 == row or j % 4 == col or j in box}
        for value in range(4):
            if value not in used:
                cells[i] = value
                fill(i + 1)

    fill(0)
    return torch.tensor(grids)


SHIDOKU_UNITS = torch.tensor(
    [[4 * r + c for c in range(4)] for r in range(4)] + [[4 * r + c for r in range(4)] for c in range(4)]
    + [[4 * r + c for r in (br, br + 1) for c in (bc, bc + 1)] for br in (0, 2) for bc in (0, 2)]
)


def local_rule_logits(tokens: torch.LongTensor) -> torch.Tensor:
    """An imperfect denoiser that knows only the local rules: a hidden cell is uniform over the values its row,
    column and box do not already hold (exact when one value is left, blind to longer-range constraints)."""
    known = torch.nn.functional.one_hot(tokens.clamp(max=3), 4).double() * (tokens != 4)[..., None]
    used_in_unit = known[:, SHIDOKU_UNITS].amax(2)  # (B, units, 4)
    member = (SHIDOKU_UNITS[None, :, :, None] == torch.arange(16)[None, None, None, :]).any(2)[0]  # (units, 16)
    used = torch.einsum("uc,buv->bcv", member.double(), used_in_unit) > 0
    allowed = torch.where((tokens == 4)[..., None], ~used, known > 0)
    allowed = torch.where(allowed.any(-1, keepdim=True), allowed, True)
    logits = torch.where(allowed, 0.0, -torch.inf).double()
    return torch.cat([logits, torch.full((*tokens.shape, 1), -torch.inf, dtype=torch.float64)], -1)


def solve_rate(puzzles, denoiser, grids, order, steps) -> float:
    scheduler = MaskedDiffusionScheduler(mask_token_id=4, sampler="parallel", unmasking_order=order)
    scheduler.set_timesteps(steps)
    tokens, generator = puzzles.clone(), torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        tokens = scheduler.step(denoiser(tokens), t, tokens, generator=generator).prev_sample
    return float((tokens[:, None] == grids[None]).all(-1).any(1).double().mean())


def test_adaptive_order_solves_more_puzzles_than_random_order():
    """Shidoku (4 x 4 Sudoku), 11 of 16 cells hidden, one cell per step, with a denoiser that knows only the local
    rules (the paper's setting: a model that is exact on easy cells and wrong on hard ones). Random order often
    guesses a hard cell and fails; confidence, margin and entropy orders fill the cells the local rules settle
    first, which is constraint propagation. For contrast (printed, not asserted): with the exact denoiser and three
    cells at a time, adaptive orders do worse than random here, since they leave the mutually dependent cells for
    the last, parallel steps."""
    grids = shidoku_grids()
    assert len(grids) == 288
    generator = torch.Generator().manual_seed(0)
    solutions = grids[torch.randint(0, len(grids), (2000,), generator=generator)]
    puzzles = torch.where(torch.rand(solutions.shape, generator=generator).argsort(1) < 11, 4, solutions)
    orders = ("random", "confidence", "margin", "entropy")
    solved = {order: solve_rate(puzzles, local_rule_logits, grids, order, 11) for order in orders}
    exact = StringMixtureDenoiser(grids, torch.ones(len(grids)), 5, 4)
    parallel = {order: solve_rate(puzzles, exact, grids, order, 4) for order in orders}
    print("\nshidoku, 11 hidden cells, fraction solved; local-rule denoiser, one cell per step:", solved,
          "\n  exact denoiser, 3-3-3-2 cells per step:", parallel)
    for order in orders[1:]:
        assert solved[order] > solved["random"] + 0.2


def test_blocks_are_decoded_left_to_right_even_when_a_step_spans_two(oracle):
    scheduler = MaskedDiffusionScheduler(mask_token_id=MASK, sampler="parallel", unmasking_order="confidence",
                                         block_length=2)
    scheduler.set_timesteps(2)
    tokens = torch.full((64, LENGTH), MASK)
    generator = torch.Generator().manual_seed(0)
    first = scheduler.step(oracle(tokens), scheduler.timesteps[0], tokens, generator=generator).prev_sample
    revealed = first != MASK
    assert revealed[:, :2].all() and (revealed[:, 2:4].sum(1) == 1).all() and not revealed[:, 4:].any()
    final = scheduler.step(oracle(first), scheduler.timesteps[1], first, generator=generator).prev_sample
    assert (final != MASK).all()


@pytest.mark.slow
def test_float32_gumbel_sampling_under_samples_the_tail():
    """One head token (logit 0) and 2^21 tail tokens at logit -17.5 hold 5 % of the mass. A float32 uniform near 1 is
    a multiple of 2^-24, so the Gumbel noise takes only the values 16.6, 15.9, 15.5, ... at the top, and a tail token
    wins only when the head's noise is below -0.9 and a tail token hit the top value: about 1.3 % instead of 5 %. The
    float32 sampler draws the tail far less often (a lower entropy); the float64 one at the exact rate. With 640
    draws the predicted float32 deficit is about 4.3 standard errors; the test asks for 3."""
    tail_tokens, gap, draws = 2**21, 17.5, 640
    exact = tail_tokens * math.exp(-gap) / (1 + tail_tokens * math.exp(-gap))
    logits = torch.full((32, 1, tail_tokens + 2), -gap, dtype=torch.float64)
    logits[..., 0] = 0.0
    mask = tail_tokens + 1
    fractions = {}
    for precision in ("float64", "float32"):
        scheduler = MaskedDiffusionScheduler(mask_token_id=mask, sampler="parallel", sampling_precision=precision)
        generator, hits = torch.Generator().manual_seed(0), 0
        for _ in range(draws // 32):
            scheduler.set_timesteps(1)
            tokens = torch.full((32, 1), mask)
            hits += int((scheduler.step(logits, 1.0, tokens, generator=generator).prev_sample > 0).sum())
        fractions[precision] = hits / draws
    error = math.sqrt(exact * (1 - exact) / draws)
    print(f"\ntail fraction: exact {exact:.4f}, float64 {fractions['float64']:.4f}, float32 {fractions['float32']:.4f} "
          f"(standard error {error:.4f})")
    assert abs(fractions["float64"] - exact) < 3 * error
    assert fractions["float32"] < exact - 3 * error


def test_compared_with_diffusers_block_refinement_in_the_same_run(oracle, tv_bound):
    """diffusers' ``BlockRefinementScheduler`` (LLaDA-style commit by confidence) ranks positions by the probability of
    the token it just drew, so the order depends on the draw and one token per step is no longer exact; ours ranks by
    the top-1 probability, a function of the current sequence only. Same exact denoiser, one token per step."""
    from diffusers import BlockRefinementScheduler

    theirs = BlockRefinementScheduler(block_length=LENGTH, num_inference_steps=LENGTH, threshold=2.0)
    theirs.set_timesteps(LENGTH)
    tokens, generator = torch.full((NUM_SAMPLES, LENGTH), MASK), torch.Generator().manual_seed(0)
    for t in theirs.timesteps:
        tokens = theirs.step(oracle(tokens).float(), t, tokens, mask_token_id=MASK, temperature=1.0,
                             generator=generator).prev_sample
    theirs_tv = oracle.total_variation(tokens)
    ours = MaskedDiffusionScheduler(mask_token_id=MASK, sampler="parallel", unmasking_order="confidence")
    ours_tv = oracle.total_variation(generate(ours, oracle, LENGTH)[0])
    print(f"\none token per step by confidence, TV to the law: ours {ours_tv:.4f}, diffusers BlockRefinement "
          f"{theirs_tv:.4f} (bound {tv_bound:.4f})")
    assert ours_tv < tv_bound and (tokens != MASK).all()
