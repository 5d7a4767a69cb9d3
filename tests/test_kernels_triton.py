"""Triton kernels against their torch references, over a grid of shapes.

Triton's CPU interpreter must be switched on (``TRITON_INTERPRET=1``) before ``triton`` is first
imported, and pytest imports every test module into one process. So in a normal run this module
defines a single test that re-runs this same file in a fresh Python with the interpreter on
(``SPLITSERVE_KERNELS=triton`` too, so the public entry points dispatch to the kernels). In that
child, or on a GPU machine with ``SPLITSERVE_TEST_DEVICE=cuda``, the grid itself runs:
head dims 64/128, GQA ratios 1/4/8, block sizes 16/32, odd lengths, contexts ending mid-block.
The interpreter runs fp32 and fp16 (its bf16 ``tl.dot`` is wrong: bf16 is checked on the GPU).
"""

from __future__ import annotations

import os
import zlib

import pytest

DEVICE = os.environ.get("SPLITSERVE_TEST_DEVICE", "cpu")
RUN_GRID = os.environ.get("TRITON_INTERPRET") == "1" or DEVICE == "cuda"

if not RUN_GRID:

    def test_kernels_in_triton_interpreter() -> None:
        from services import rerun_under_triton_interpreter

        rerun_under_triton_interpreter(__file__, timeout=280)

else:
    import torch
    from splitserve.kernels import attention, ops
    from splitserve.kernels.triton_decode_attention import decode_attention_triton
    from splitserve.kernels.triton_norm import add_rms_norm_triton, rms_norm_triton
    from splitserve.kernels.triton_prefill_attention import prefill_attention_triton
    from splitserve.kernels.triton_rope_kv import rope_and_write_kv_triton
    from splitserve.kernels.triton_swiglu import silu_and_mul_triton

    if DEVICE == "cuda":
        DTYPES = [torch.float32, torch.bfloat16, torch.float16]
    else:
        DTYPES = [torch.float32, torch.float16]
    TOL = {
        torch.float32: dict(atol=2e-5, rtol=2e-5),
        torch.float16: dict(atol=4e-3, rtol=4e-3),
        torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    }
    REL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
    GRID = [(d, ratio, bs) for d in (64, 128) for ratio in (1, 4, 8) for bs in (16, 32)]

    def _gen(*key: object) -> torch.Generator:
        """A generator seeded from the test case: fresh inputs per case, same on every run."""
        return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))

    def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)

    def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert torch.isfinite(out).all()
        rel = (out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)
        assert rel < REL[dtype], f"relative error {rel:.2e}"
        torch.testing.assert_close(out, ref, **TOL[dtype])

    def _paged(gen, ctxs, num_kv_heads, head_dim, block_size, dtype):
        """A random cache and block tables (shuffled, disjoint blocks) for contexts ``ctxs``."""
        need = [-(-c // block_size) for c in ctxs]
        width = max(need) + 1  # one spare column: the table is wider than any context
        num_blocks = sum(need) + 3
        kv = _randn(gen, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
        perm = torch.randperm(num_blocks, generator=gen)
        table = torch.zeros(len(ctxs), width, dtype=torch.int32)
        used = 0
        for b, n in enumerate(need):
            table[b, :n] = perm[used : used + n]
            used += n
        lens = torch.tensor(ctxs, dtype=torch.int32, device=DEVICE)
        return kv, table.to(DEVICE), lens

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("head_dim,ratio,block_size", GRID)
    def test_decode_attention(head_dim, ratio, block_size, dtype) -> None:
        gen = _gen("decode", head_dim, ratio, block_size, dtype)
        num_kv_heads = 2
        ctxs = [1, block_size + 3, 3 * block_size - 5, 2 * block_size]
        kv, table, lens = _paged(gen, ctxs, num_kv_heads, head_dim, block_size, dtype)
        q = _randn(gen, len(ctxs), num_kv_heads * ratio, head_dim, dtype=dtype)
        scale = head_dim**-0.5
        ref = attention.decode_attention_ref(q, kv, table, lens, scale)
        for splits in (1, 3):
            out = decode_attention_triton(q, kv, table, lens, scale, num_splits=splits)
            _check(out, ref, dtype)
        _check(attention.decode_attention(q, kv, table, lens, scale), ref, dtype)

    def test_decode_attention_empty_context_gives_zeros() -> None:
        gen = _gen("decode-empty")
        kv, table, lens = _paged(gen, [0, 5], 1, 64, 16, torch.float32)
        q = _randn(gen, 2, 4, 64, dtype=torch.float32)
        for splits in (1, 2):
            out = decode_attention_triton(q, kv, table, lens, 0.125, num_splits=splits)
            assert (out[0] == 0).all()

    PREFILL_SEQS = {  # (new tokens, context) per sequence: fresh prompts, cached prefixes, 1-token
        16: [(5, 5), (1, 1), (23, 40), (17, 17), (1, 38)],
        32: [(37, 37), (3, 70), (20, 33)],
    }

    def _prefill_case(gen, seqs, num_kv_heads, ratio, head_dim, block_size, dtype):
        """Packed q, a paged cache holding every context, and the new tokens' own k/v."""
        kv, table, lens = _paged(gen, [c for _, c in seqs], num_kv_heads, head_dim, block_size, dtype)
        cu = [0]
        for n, _ in seqs:
            cu.append(cu[-1] + n)
        cu_q = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
        q = _randn(gen, cu[-1], num_kv_heads * ratio, head_dim, dtype=dtype)
        news = [attention.gather_kv(kv, table[b], c) for b, (_, c) in enumerate(seqs)]
        k = torch.cat([nk[c - n :] for (nk, _), (n, c) in zip(news, seqs, strict=True)])
        v = torch.cat([nv[c - n :] for (_, nv), (n, c) in zip(news, seqs, strict=True)])
        # v as a strided view of a fused projection, the way the model passes it
        v = torch.cat([v, v], 1)[:, num_kv_heads:]
        return q, kv, table, cu_q, lens, k, v

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("head_dim,ratio,block_size", GRID)
    def test_prefill_attention(head_dim, ratio, block_size, dtype) -> None:
        gen = _gen("prefill", head_dim, ratio, block_size, dtype)
        seqs = PREFILL_SEQS[block_size]
        num_kv_heads = 2 if ratio < 8 else 1
        q, kv, table, cu_q, lens, k, v = _prefill_case(
            gen, seqs, num_kv_heads, ratio, head_dim, block_size, dtype
        )
        scale = head_dim**-0.5
        ref = attention.prefill_attention_ref(q, kv, table, cu_q, lens, scale)
        out = prefill_attention_triton(q, kv, table, cu_q, lens, scale, block_m=16, block_n=16)
        _check(out, ref, dtype)
        # the new tokens' keys/values read from k/v instead of the cache: through tensor
        # descriptors (the default where allowed) or plain loads, alternating over the grid;
        # key tiles narrower and wider than the query tiles (several diagonal tiles; an
        # off-diagonal range that ends mid-tile)
        tiles = dict(block_m=32, block_n=16) if ratio != 4 else dict(block_m=16, block_n=32)
        tma = None if (head_dim // 64 + block_size // 16) % 2 else False
        out = prefill_attention_triton(q, kv, table, cu_q, lens, scale, k=k, v=v, tma=tma, **tiles)
        _check(out, ref, dtype)
        if head_dim == 64 and block_size == 16:  # the default (GPU) tiles, through the dispatch
            _check(attention.prefill_attention(q, kv, table, cu_q, lens, scale), ref, dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_prefill_attention_long_default_tiles(dtype) -> None:
        """Prompts longer than the default tiles: the unmasked prefix and off-diagonal loops run
        many full tiles (the small grid above mostly exercises the masked ones)."""
        gen = _gen("prefill-long", dtype)
        seqs = [(201, 201), (150, 350), (1, 77)]
        q, kv, table, cu_q, lens, k, v = _prefill_case(gen, seqs, 1, 2, 128, 16, dtype)
        ref = attention.prefill_attention_ref(q, kv, table, cu_q, lens, 128**-0.5)
        _check(prefill_attention_triton(q, kv, table, cu_q, lens, 128**-0.5), ref, dtype)
        _check(prefill_attention_triton(q, kv, table, cu_q, lens, 128**-0.5, k=k, v=v), ref, dtype)

    def test_prefill_attention_rejects_bad_fresh_kv() -> None:
        gen = _gen("prefill-errors")
        q, kv, table, cu_q, lens, k, v = _prefill_case(gen, [(5, 9)], 2, 2, 64, 16, torch.float32)
        with pytest.raises(ValueError):
            prefill_attention_triton(q, kv, table, cu_q, lens, 0.1, k=k)  # v missing
        with pytest.raises(ValueError):
            prefill_attention_triton(q, kv, table, cu_q, lens, 0.1, k=k[:4], v=v[:4])
        with pytest.raises(TypeError):
            prefill_attention_triton(q, kv, table, cu_q, lens, 0.1, k=k.half(), v=v.half())
        with pytest.raises(ValueError):  # heads not packed: no 2-D descriptor can describe it
            spread = torch.zeros(5, 2, 2, 64, device=DEVICE)[:, :, 0]
            prefill_attention_triton(q, kv, table, cu_q, lens, 0.1, k=spread, v=spread, tma=True)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("head_dim,ratio", [(64, 1), (64, 4), (128, 8), (128, 4)])
    def test_rope_and_write_kv(head_dim, ratio, dtype) -> None:
        gen = _gen("rope", head_dim, ratio, dtype)
        num_tokens, num_kv_heads, block_size, num_blocks = 11, 2, 16, 4
        num_heads = num_kv_heads * ratio
        # q, k, v as strided views of one fused projection, as the model passes them
        qkv = _randn(gen, num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        q, k, v = qkv.split(sizes, -1)
        q = q.view(num_tokens, num_heads, head_dim)
        k = k.view(num_tokens, num_kv_heads, head_dim)
        v = v.view(num_tokens, num_kv_heads, head_dim)
        pos = torch.randint(0, 4096, (num_tokens,), generator=gen).float()
        freqs = pos[:, None] / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))[None, :]
        cos, sin = freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)
        slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)
        slots[4] = -1  # a padded row: no cache write
        cache = _randn(gen, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
        cache_ref = cache.clone()
        q_out, k_out = rope_and_write_kv_triton(q, k, v, cos, sin, cache, slots)
        keep = slots >= 0
        q_ref, k_ref = ops.rotate_ref(q, cos, sin), ops.rotate_ref(k, cos, sin)
        attention.write_kv(cache_ref, k_ref[keep], v[keep], slots[keep])
        _check(q_out, q_ref, dtype)
        _check(k_out, k_ref, dtype)
        _check(cache, cache_ref, dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("hidden", [64, 300, 1024])
    def test_rms_norm(hidden, dtype) -> None:
        gen = _gen("norm", hidden, dtype)
        x = _randn(gen, 2, 7, hidden, dtype=dtype)
        residual = _randn(gen, 2, 7, hidden, dtype=dtype)
        weight = _randn(gen, hidden, dtype=dtype)
        out, summed = add_rms_norm_triton(x, residual, weight, 1e-6)
        out_ref, summed_ref = ops.add_rms_norm_ref(x, residual, weight, 1e-6)
        _check(summed, summed_ref, dtype)
        _check(out, out_ref, dtype)
        _check(rms_norm_triton(x, weight, 1e-5), ops.rms_norm_ref(x, weight, 1e-5), dtype)
        _check(ops.add_rms_norm(x, residual, weight, 1e-6)[0], out_ref, dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("inter", [1, 100, 1500])
    def test_silu_and_mul(inter, dtype) -> None:
        gen = _gen("swiglu", inter, dtype)
        gate_up = _randn(gen, 3, 5, 2 * inter, dtype=dtype) * 3
        ref = ops.silu_and_mul_ref(gate_up)
        _check(silu_and_mul_triton(gate_up), ref, dtype)
        _check(ops.silu_and_mul(gate_up), ref, dtype)

    def test_wrappers_reject_bad_inputs() -> None:
        gen = _gen("errors")
        kv, table, lens = _paged(gen, [5], 2, 64, 16, torch.float32)
        q = _randn(gen, 1, 4, 64, dtype=torch.float32)
        with pytest.raises(TypeError):
            decode_attention_triton(q.half(), kv, table, lens, 0.1)
        with pytest.raises(ValueError):
            decode_attention_triton(q[:, :3], kv, table, lens, 0.1)  # 3 heads over 2 KV heads
        with pytest.raises(TypeError):
            decode_attention_triton(q, kv, table.float(), lens, 0.1)
        cu = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
        with pytest.raises(ValueError):
            prefill_attention_triton(q, kv, table, cu[:1], lens, 0.1)
        with pytest.raises(ValueError):
            silu_and_mul_triton(_randn(gen, 2, 5, dtype=torch.float32))
        with pytest.raises(ValueError):
            rms_norm_triton(q, _randn(gen, 63, dtype=torch.float32), 1e-6)
        with pytest.raises(ValueError):
            rms_norm_triton(q.transpose(1, 2), _randn(gen, 4, dtype=torch.float32), 1e-6)
