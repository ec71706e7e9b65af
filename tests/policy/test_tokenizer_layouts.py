"""The LM tokenizer from HF folders in both layouts: as the installed transformers saves it (tokenizer.json,
tokenizer_config.json, chat_template.jinja) and the legacy one (vocab.json + merges.txt, special_tokens_map.json, the
chat template inside tokenizer_config.json): the same ids as transformers and as the GGUF's own tokenizer, the same
special tokens and chat template."""
from __future__ import annotations

import json

import pytest

from posi_jax.errors import PosiError
from posi_jax.policy.tokenizer import Tokenizer

TEXTS = ["<|im_start|>user\nhello world 123 café<|im_end|>", "  leading spaces and\ttabs\n\nnewlines",
         "emoji 🤖🎨 and 日本語", "a gory photo of a bloody murder scene, dismembered body, horror", ""]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a cat"}]


@pytest.fixture(scope="module")
def saved_folder(tiny_llama_folder, tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("saved_by_transformers")
    AutoTokenizer.from_pretrained(tiny_llama_folder).save_pretrained(folder)
    assert {p.name for p in folder.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    return folder


@pytest.fixture(scope="module")
def legacy_folder(saved_folder, tmp_path_factory):
    """vocab.json + merges.txt written by the `tokenizers` library; settings files as transformers 4 wrote them."""
    from tokenizers import Tokenizer as Backend
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("legacy")
    Backend.from_file(str(saved_folder / "tokenizer.json")).model.save(str(folder))
    added = AutoTokenizer.from_pretrained(saved_folder).added_tokens_decoder
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "chat_template": (saved_folder / "chat_template.jinja").read_text(),
        "added_tokens_decoder": {str(i): {"content": t.content, "special": t.special, "lstrip": False,
                                          "rstrip": False, "normalized": False, "single_word": False}
                                 for i, t in added.items()}}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>", "lstrip": False}, "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}))
    assert {p.name for p in folder.iterdir()} == {"vocab.json", "merges.txt", "tokenizer_config.json",
                                                  "special_tokens_map.json"}
    return folder


def test_both_layouts_match_transformers_and_the_gguf(saved_folder, legacy_folder, smollm2_tokenizer):
    from transformers import AutoTokenizer, GPT2Tokenizer

    saved, legacy = Tokenizer.from_folder(saved_folder), Tokenizer.from_folder(legacy_folder)
    refs = (AutoTokenizer.from_pretrained(saved_folder), GPT2Tokenizer.from_pretrained(legacy_folder))
    for text in TEXTS:
        want = smollm2_tokenizer.encode(text)
        assert saved.encode(text) == legacy.encode(text) == want, text
        assert all(ref.encode(text, add_special_tokens=False) == want for ref in refs), text
        assert saved.decode(want) == legacy.decode(want) == smollm2_tokenizer.decode(want)
    assert saved.encode(TEXTS[0])[0] == legacy.encode(TEXTS[0])[0] == 1  # a special token is never split
    for tok in (saved, legacy):
        assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, (2,), 2)
        assert tok.chat_template == smollm2_tokenizer.chat_template
        assert tok.apply_chat_template(MESSAGES) == smollm2_tokenizer.apply_chat_template(MESSAGES)


def test_chat_template_json_and_missing_files(legacy_folder, tmp_path):
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(legacy_folder, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    template = cfg.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))  # transformers 4.43-4.46
    assert Tokenizer.from_folder(folder).chat_template == template
    for name in ("vocab.json", "special_tokens_map.json"):
        (folder / name).unlink()
        with pytest.raises(PosiError, match="no tokenizer files" if name == "vocab.json" else "no usable eos_token"):
            Tokenizer.from_folder(folder)
        if name == "vocab.json":
            shutil.copy(legacy_folder / name, folder / name)
    with pytest.raises(PosiError, match="tokenizer folder not found"):
        Tokenizer.from_folder(tmp_path / "nope")
