"""rocmforge as the KV cache of Hugging Face transformers models: generate() with
RocmforgeCache must give the same tokens as with transformers' own DynamicCache
(the oracle), for small random-weight Llama- and Qwen2-style models with
grouped-query attention, on the CPU in float32 and on a GPU in bfloat16 and
float16. Skips without torch and transformers."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from rocmforge.integrations.transformers import RocmforgeCache, cache_kwarg  # noqa: E402

ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
MODES = ["gather", "paged"]
GPU_DTYPES = [pytest.param(d, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="no GPU")])
              for d in (torch.bfloat16, torch.float16, torch.float32)]


def build(arch="llama", layers=2, hidden=256, device="cpu", dtype=torch.float32, seed=0):
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0)
    return model_cls(cfg).eval().to(device=device, dtype=dtype)


def prompts(lens, seed=1, device="cpu", prefix=()):
    """Left-padded random prompts (ids 1..255 after an optional shared prefix) and their mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lens) + len(prefix)
    ids = torch.zeros(len(lens), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        row = torch.cat([torch.tensor(prefix, dtype=torch.long), torch.randint(1, 256, (n,), generator=g)])
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def generate(model, ids, mask, cache, seed=None, **kw):
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=kw.pop("new", 64),
                              pad_token_id=0, **kw)


def dynamic(model):
    return DynamicCache(config=model.config)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_generation_is_token_identical_to_dynamic_cache(arch, mode):
    model = build(arch)
    ids, mask = prompts([5, 9, 12, 17, 3, 20, 8, 14])
    with RocmforgeCache(model, num_blocks=256, attention=mode) as cache:
        got = generate(model, ids, mask, cache, do_sample=False)
        assert torch.equal(got, generate(model, ids, mask, dynamic(model), do_sample=False))
        assert got.shape == (8, 20 + 64) and cache.attention_path == mode and cache.batch_size == 8
        assert torch.equal(got, model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                                               pad_token_id=0, **cache_kwarg(model, cache.reset() or cache)))
        held = [n + 63 for n in (5, 9, 12, 17, 3, 20, 8, 14)] if mode == "paged" else [20 + 63] * 8
        assert cache.kv.manager.num_used_blocks == sum(-(-n // 16) for n in held)   # paged: no padding stored
        cache.reset()
        assert cache.kv.manager.num_used_blocks == 0
        cache.kv.manager.check_invariants()
    assert model.config._attn_implementation == "sdpa"             # close() put it back


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_paged_rows_share_a_prefix_whatever_their_padding():
    """Paged mode stores each row's real tokens only, so rows of different lengths
    share the whole blocks of a common prefix; gather mode stores the padding too."""
    model = build("qwen2", seed=2)
    ids, mask = prompts([3, 9, 14, 6], seed=10, prefix=list(range(1, 34)))     # 33 shared: 2 whole blocks
    used = {}
    for mode in MODES:
        with RocmforgeCache(model, num_blocks=256, attention=mode) as cache:
            got = generate(model, ids, mask, cache, do_sample=False, new=16)
            assert torch.equal(got, generate(model, ids, mask, dynamic(model), do_sample=False, new=16))
            used[mode] = cache.kv.manager.num_used_blocks
    assert used["paged"] <= used["gather"] - 3 * 2                  # three rows reuse the first row's 2 blocks


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_sampled_generation_with_a_seed_is_identical(arch, mode):
    model = build(arch, seed=3)
    ids, mask = prompts([7, 2, 11, 5], seed=4)
    with RocmforgeCache(model, num_blocks=128, attention=mode) as cache:
        kw = dict(do_sample=True, temperature=0.9, top_k=50, new=40)
        assert torch.equal(generate(model, ids, mask, cache, seed=11, **kw),
                           generate(model, ids, mask, dynamic(model), seed=11, **kw))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("mode", MODES)
def test_a_shared_prefix_is_reused_across_calls_with_fewer_model_tokens(mode):
    model = build("qwen2")
    system = list(range(1, 50))                                    # 49 tokens: 3 whole blocks of 16
    first, first_mask = prompts([6, 6, 6], seed=5, prefix=system)
    second, second_mask = prompts([6, 6, 6, 6], seed=6, prefix=system)
    with RocmforgeCache(model, num_blocks=256, attention=mode) as cache:
        generate(model, first, first_mask, cache, do_sample=False, new=8)
        before = cache.model_tokens
        assert cache.prepare(second, second_mask) == 48            # every row: 3 blocks from the first call
        got = generate(model, second, second_mask, cache, do_sample=False, new=8)
        assert torch.equal(got, generate(model, second, second_mask, dynamic(model), do_sample=False, new=8))
        computed = cache.model_tokens - before
        assert computed == 4 * (second.shape[1] - 48) + 4 * 7      # the rest of each prompt, then 7 steps
        assert cache.kv.manager.stats()["prefix_hit_tokens"] >= 4 * 48


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("mode", MODES)
def test_rows_of_one_prompt_share_its_blocks(mode):
    model = build("llama")
    ids, mask = prompts([40, 21], seed=7)
    with RocmforgeCache(model, num_blocks=256, attention=mode) as cache:
        kw = dict(do_sample=True, num_return_sequences=4, new=10)
        got = generate(model, ids, mask, cache, seed=2, **kw)
        assert torch.equal(got, generate(model, ids, mask, dynamic(model), seed=2, **kw))
        m = cache.kv.manager
        tables = m.block_tables(cache._rows)
        for group, whole in ((tables[:4], 2), (tables[4:], 2 if mode == "gather" else 1)):
            assert (group[:, :whole] == group[0, :whole]).all()    # the prompt's whole blocks: shared
        assert m.num_used_blocks < 8 * tables.shape[1]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("kw", [dict(num_return_sequences=3, do_sample=True), dict(num_beams=3)])
def test_paged_decode_steps_upload_the_managers_tables(monkeypatch, kw):
    """A paged decode step updates the kept tables where the appended positions
    landed (a new block, or a copy of a shared last block on write) instead of
    asking the manager for them; after every such step they equal the manager's
    (forks of one prompt: copies on write). Beam search reorders the rows every
    step, so each of its steps takes the manager's tables afresh."""
    model = build("llama")
    ids, mask = prompts([23, 9], seed=3)
    seen = []
    with RocmforgeCache(model, num_blocks=256, attention="paged") as cache:
        def checked(slots, original=cache._decode_upload):
            done = original(slots)
            if done:
                m = cache.kv.manager
                want = m.block_tables(cache._rows)
                got = cache._tables.cpu().numpy()
                assert np.array_equal(got[:, :want.shape[1]], want) and (got[:, want.shape[1]:] == -1).all()
                assert cache._lens.cpu().tolist() == [m.num_tokens(sid) for sid in cache._rows]
                assert cache._slots.cpu().tolist() == list(slots)
            seen.append(done)
            return done
        monkeypatch.setattr(cache, "_decode_upload", checked)
        got = generate(model, ids, mask, cache, seed=4, new=50, **kw)
        assert torch.equal(got, generate(model, ids, mask, dynamic(model), seed=4, new=50, **kw))
    if "num_beams" in kw:
        assert seen and not any(seen)
    else:                                       # most steps kept; some rebuilt (a table outgrew its width)
        assert sum(seen) > 40 and not all(seen)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("mode", MODES)
def test_beam_search_is_identical(mode):
    model = build("llama", seed=5)
    ids, mask = prompts([9, 4, 13], seed=8)
    with RocmforgeCache(model, num_blocks=256, attention=mode) as cache:
        kw = dict(do_sample=False, num_beams=3, new=12)
        assert torch.equal(generate(model, ids, mask, cache, **kw), generate(model, ids, mask, dynamic(model), **kw))
        cache.kv.manager.check_invariants()


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("mode", MODES)
def test_a_prompt_forward_that_runs_out_of_memory_between_rows_is_undone_by_reset(mode):
    """The prompt's forward adds its rows one by one; the core's allocation-fault
    hook fails the n-th allocation, for each n that fails the forward. Whether
    rows were added or not, the next forward is refused until reset(), and
    after it the tokens are DynamicCache's: a row added before the failure left
    no blocks cached without their K/V."""
    from rocmforge import _core
    model = build("llama", layers=2, hidden=64)
    ids, mask = prompts([9, 12, 6], seed=13)
    want = generate(model, ids, mask, dynamic(model), do_sample=False, new=4)
    partial = 0
    for n in range(1, 11):
        with RocmforgeCache(model, num_blocks=64, block_size=4, attention=mode) as cache:
            _core._fail_allocation(n)
            try:
                generate(model, ids, mask, cache, do_sample=False, new=4)
                continue
            except MemoryError:
                pass
            finally:
                _core._fail_allocation(0)
            partial += len(cache.kv.manager) > 0
            with pytest.raises(Exception, match="call reset"):
                generate(model, ids, mask, cache, do_sample=False, new=4)
            cache.reset()
            assert torch.equal(generate(model, ids, mask, cache, do_sample=False, new=4), want), n
    assert partial


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_reorder_that_runs_out_of_memory_halfway_leaves_the_rows_as_they_were():
    """Beam search's reorder_cache forks every new row before dropping the old
    ones: when a fork fails (the core's allocation-fault hook), the forks made
    so far are dropped again, so nothing is left behind and the rows stand."""
    from rocmforge import _core
    model = build("llama", layers=1, hidden=64)
    ids, mask = prompts([5, 7], seed=3)
    with RocmforgeCache(model, num_blocks=64, block_size=4, attention="gather") as cache:
        generate(model, ids, mask, cache, do_sample=False, new=3)
        m, refused = cache.kv.manager, 0
        for n in range(1, 12):
            before = (m.sequence_ids().tolist(), m.num_used_blocks, list(cache._rows))
            _core._fail_allocation(n)
            try:
                cache.reorder_cache(torch.tensor([1, 0]))
            except MemoryError:
                refused += 1
                assert (m.sequence_ids().tolist(), m.num_used_blocks, list(cache._rows)) == before
            finally:
                _core._fail_allocation(0)
        assert refused and len(m) == 2
        m.check_invariants()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_nothing_leaks_across_a_thousand_generate_calls():
    model = build("llama", layers=1, hidden=64)
    ids, mask = prompts([3, 5], seed=9)
    with RocmforgeCache(model, num_blocks=16, block_size=4) as cache:
        for i in range(1000):
            generate(model, ids, mask, cache, do_sample=False, new=2)
            cache.reset()
            assert cache.kv.manager.num_used_blocks == 0, i
        cache.kv.manager.check_invariants()
        kv = cache.kv
    assert kv.closed


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_bad_uses_raise_clear_errors():
    model = build("llama", layers=1, hidden=64)
    with pytest.raises(Exception, match="float32, float16 or bfloat16"):
        RocmforgeCache(model.to(torch.float64))
    model = model.to(torch.float32)
    ids, mask = prompts([3, 5], seed=9)
    with RocmforgeCache(model, num_blocks=16, block_size=4) as cache:
        cache.prepare(ids)
        with pytest.raises(Exception, match="prepare"):                # 3 rows for 2
            generate(model, torch.cat([ids, ids[:1]]), torch.cat([mask, mask[:1]]), cache, do_sample=False, new=2)
        cache.prepare(ids)
        with pytest.raises(Exception, match="prepare"):                # other prompts
            generate(model, ids.flip(0), mask.flip(0), cache, do_sample=False, new=2)
        assert cache.kv.manager.num_used_blocks == 0
        with pytest.raises(NotImplementedError):
            cache.crop(-1)
        with pytest.raises(Exception, match="blocks"):                 # 16 blocks of 4: too few
            generate(model, ids, mask, cache, do_sample=False, new=200)
        cache.reset()
        assert cache.kv.manager.num_used_blocks == 0
        assert torch.equal(generate(model, ids, mask, cache, do_sample=False, new=4),
                           generate(model, ids, mask, dynamic(model), do_sample=False, new=4))


def forced_logits(model, ids, mask, full, cache):
    """The model's next-token logits (float32, [batch, steps, vocab]) at every step
    of `full` (prompt then generated tokens), fed those tokens one by one after
    the prompt: the decode path with every cache given the same inputs."""
    out, logits = None, []
    with torch.no_grad():
        for t in range(ids.shape[1], full.shape[1]):
            if out is None:
                step, m = ids, mask
            else:
                step, m = full[:, t - 1:t], torch.cat([m, torch.ones_like(full[:, :1])], 1)
            pos = (m.cumsum(-1) - 1).clamp(min=0)[:, -step.shape[1]:]
            out = model(input_ids=step, attention_mask=m, position_ids=pos, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("hidden", [256, 512])
@pytest.mark.parametrize("mode", ["auto", "gather"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_gpu_generation_matches_dynamic_cache(arch, dtype, mode, hidden):
    """Gather mode, and paged mode in float32, give DynamicCache's tokens exactly.
    The paged kernel in bfloat16/float16 sums in another order than SDPA, so its
    outputs round differently and greedy tokens part at near-ties; there, with
    both fed the same tokens, its logits must be as close to the float32 model's
    as SDPA's are. Hidden 256 has heads of 32 (the general kernel); 512 has
    heads of 64, which bfloat16/float16 read on tensor cores."""
    model = build(arch, device="cuda", dtype=dtype, hidden=hidden)
    ids, mask = prompts([5, 9, 12, 17, 3, 20, 8, 14], device="cuda")
    ref = generate(model, ids, mask, dynamic(model), do_sample=False)
    with RocmforgeCache(model, num_blocks=256, attention=mode) as cache:
        assert cache.kv.device.startswith(("cuda", "hip"))
        assert cache.attention_path == ("paged" if mode == "auto" else "gather")
        got = generate(model, ids, mask, cache, do_sample=False)
        if mode == "gather" or dtype == torch.float32:
            assert torch.equal(got, ref)
            return
        cache.reset()
        ours = forced_logits(model, ids, mask, ref, cache)
    theirs = forced_logits(model, ids, mask, ref, dynamic(model))
    exact = build(arch, device="cuda", dtype=torch.float32, hidden=hidden)
    truth = forced_logits(exact, ids, mask, ref, dynamic(exact))
    for stat in (torch.max, torch.mean):
        assert stat((ours - truth).abs()) <= 1.25 * stat((theirs - truth).abs())


def test_the_example_prints_a_table_then_json(capsys):
    from rocmforge.examples import hf_generate
    import json
    assert hf_generate.main(["--batch", "3", "--prompt-len", "40", "--shared-prefix", "32", "--new", "4",
                             "--layers", "1", "--hidden", "64", "--reps", "1", "--block-size", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["identical"] and lines[1].split() == ["cache", "tokens/s", "KV", "MiB"]
    assert result["rocmforge_kv_bytes"] < result["DynamicCache_kv_bytes"]     # the shared 32 tokens once


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_paged_decode_steps_build_no_attention_mask(monkeypatch):
    """The paged kernels take each row's length, so a decode step builds no mask
    (on a GPU, SDPA's checks one with a device sync); a padded prompt's forward,
    which goes through SDPA, still gets its mask, and the tokens stay the same."""
    from rocmforge.integrations import transformers as integration

    model = build("llama", seed=5)
    ids, mask = prompts([6, 11, 3, 9], seed=14)
    want = generate(model, ids, mask, dynamic(model), do_sample=False, new=12)
    built = []
    real = integration.sdpa_mask
    monkeypatch.setattr(integration, "sdpa_mask", lambda *a, **k: built.append(k.get("q_length")) or real(*a, **k))
    with RocmforgeCache(model, num_blocks=64, attention="paged") as cache:
        got = generate(model, ids, mask, cache, do_sample=False, new=12)
    assert torch.equal(got, want)
    assert built == [ids.shape[1]]                  # the prompt's forward only


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_paged_rows_give_their_blocks_back_at_eos():
    model = build("llama", seed=4)
    ids, mask = prompts([6, 11, 3, 9], seed=12)
    free_run = generate(model, ids, mask, dynamic(model), do_sample=False, new=48)
    eos = int(free_run[0, ids.shape[1] + 4])                        # row 0 ends after 5 tokens
    want = generate(model, ids, mask, dynamic(model), do_sample=False, new=48, eos_token_id=eos)
    with RocmforgeCache(model, num_blocks=256, attention="paged", eos_token_id=eos) as cache:
        got = generate(model, ids, mask, cache, do_sample=False, new=48, eos_token_id=eos)
        assert torch.equal(got, want)
        m = cache.kv.manager
        done = sorted(cache._done)
        assert 0 in done
        for i, sid in enumerate(cache._rows):
            assert (m.num_tokens(sid) == 0) == (i in done)          # finished rows hold nothing
        m.check_invariants()
    with pytest.raises(Exception, match="paged"):
        RocmforgeCache(model, attention="gather", eos_token_id=eos)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fail_at", [1, 5], ids=["prefill", "decode"])
def test_a_model_that_raises_mid_generation_leaves_the_cache_usable(mode, fail_at):
    """The forward fail_at raises after layer 0 wrote its K/V and before layer 1
    did. The blocks it completed were cached as it began, so reset() must drop
    them, or the next generation of that prompt would reuse blocks without
    layer 1's K/V; a forward before reset() is refused with a clear error.
    What an earlier generation cached stays."""
    model = build("llama", layers=2, hidden=64)
    ids, mask = prompts([9, 12], seed=13)
    calls = {"n": 0}

    def fail(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("the model failed")

    with RocmforgeCache(model, num_blocks=64, block_size=4, attention=mode) as cache:
        generate(model, *prompts([10, 7], seed=14), cache, do_sample=False, new=3)
        cache.reset()
        kept = cache.kv.manager.num_cached_blocks
        assert kept > 0
        hook = model.model.layers[1].register_forward_pre_hook(fail, with_kwargs=True)
        with pytest.raises(RuntimeError, match="the model failed"):
            generate(model, ids, mask, cache, do_sample=False, new=10)
        hook.remove()
        cache.kv.manager.check_invariants()
        with pytest.raises(Exception, match="call reset"):
            generate(model, ids, mask, cache, do_sample=False, new=10)
        cache.reset()
        assert cache.kv.manager.num_used_blocks == 0 and cache.kv.manager.num_cached_blocks == kept
        assert torch.equal(generate(model, ids, mask, cache, do_sample=False, new=10),
                           generate(model, ids, mask, dynamic(model), do_sample=False, new=10))
    assert model.config._attn_implementation == "sdpa"
