"""LoLDU's small adapter files on a real LLM (SmolLM2-135M, cached by the install step)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model

import ortho_adapters


@pytest.mark.slow
def test_full_rank_smollm2_adapter_is_small_and_reloads_bit_identically(tmp_path):
    from ortho_adapters import data

    base, _ = data.load_smollm2()
    config = ortho_adapters.LoLDUConfig(target_modules=["q_proj", "v_proj"])  # r=None: full rank per layer
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1 + 0.01 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, 1000, (2, 24), generator=g)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(expected, tmp_path / "expected.pt")
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ranks = sorted(
        {m.r["default"] for m in model.modules() if isinstance(m, ortho_adapters.loldu.LoLDULayer)}
    )
    print(f"LoLDU full rank (r={ranks}) on SmolLM2 q_proj,v_proj: {size / 1e6:.3f} MB, {trainable} trainable")
    assert size < 1_000_000
    # reload in a fresh process: the factors are rebuilt from the base weight and the fingerprint checked
    script = textwrap.dedent(
        f"""
        import torch, ortho_adapters
        from peft import PeftModel
        from ortho_adapters import data
        base, _ = data.load_smollm2()
        model = PeftModel.from_pretrained(base, {str(tmp_path)!r})
        ids = torch.load({str(tmp_path / "ids.pt")!r}, weights_only=True)
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, expected), "reloaded logits differ"
        print("bit-identical")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bit-identical" in result.stdout
