"""The client profile (FedDPA's instance weighting): the base model's pooled prompt states, adapters disabled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError
from fedlm.data.tokenize import TokenizedExample
from fedlm.experiment import build_session
from fedlm.personalization.profile import compute_profile, embed_prompts, load_profile, prompt_ids, save_profile
from fedlm.reporting.progress import RunConsole


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    return build_session(validate_config(tiny_config(root / "run")), RunConsole(quiet=True))


def test_prompt_part_of_a_conversation() -> None:
    ex = TokenizedExample(input_ids=[5, 6, 7, 8], labels=[-100, -100, 7, 8])
    assert prompt_ids(ex) == [5, 6]
    assert prompt_ids([3, 4]) == [3, 4]
    assert prompt_ids(TokenizedExample(input_ids=[1, 2], labels=[-100, -100])) == [1, 2]


def test_profile_is_the_base_models_mean_pooled_state_whatever_the_adapter(session, tmp_path: Path) -> None:
    model, tok = session.model, session.loaded.tokenizer
    examples = session.data.client_train[session.data.client_names[0]][:5]
    with torch.no_grad():  # the adapter must not matter: make B non-zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    got = compute_profile(model, tok, examples, session.loaded.device, batch_size=2)
    base = model.get_base_model()
    expected = []
    with model.disable_adapter(), torch.no_grad():  # one prompt at a time: no padding at all
        for ex in examples:
            ids = torch.tensor([prompt_ids(ex)])
            expected.append(base(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].mean(0))
    torch.testing.assert_close(got, torch.stack(expected).mean(0), rtol=1e-5, atol=1e-5)
    assert got.dtype == torch.float32 and got.shape == (base.config.hidden_size,)
    assert embed_prompts(model, tok, examples, "cpu").shape == (5, base.config.hidden_size)
    save_profile(tmp_path / "c" / "profile.safetensors", got)
    assert torch.equal(load_profile(tmp_path / "c" / "profile.safetensors"), got)
    with pytest.raises(FedlmError, match="missing"):
        load_profile(tmp_path / "nowhere.safetensors")
