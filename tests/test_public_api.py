"""The public surface: explicit exports and Auto-class registration of the installed package."""

import pinfm_hf
import pinfm_hf.data
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining
from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING


def test_exports_resolve():
    for module in (pinfm_hf, pinfm_hf.data):
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"


def test_auto_classes_know_pinfm_without_remote_code():
    config = AutoConfig.for_model("pinfm", item_vocab_size=100, hidden_size=32, num_attention_heads=2)
    assert isinstance(config, pinfm_hf.PinFMConfig)
    assert isinstance(AutoModel.from_config(config), pinfm_hf.PinFMModel)
    assert isinstance(AutoModelForPreTraining.from_config(config), pinfm_hf.PinFMForPretraining)
    registered = TOKENIZER_MAPPING[pinfm_hf.PinFMConfig]
    assert pinfm_hf.PinFMTokenizer in (registered if isinstance(registered, tuple) else (registered,))
