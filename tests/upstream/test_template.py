"""Upstream fact 1: every upstream POSI command uses LLaMA-Factory's `--template default`. Our `default` prompt format
against a reference built by hand from that template's definition (upstream src/llmtuner/data/template.py and
preprocess.py), tokenized piece by piece with the SentencePiece library itself, on a LLaMA-style tokenizer with no chat
template; the automatic choice of the format; the format travelling with an adapter and an exported folder."""
from __future__ import annotations

import numpy as np
import pytest

from posi_jax.data.posi import POSI_INSTRUCTION, PosiRecord
from posi_jax.errors import PosiError
from posi_jax.policy.chat import encode_example, request_ids, response_text, template_of, use_template
from posi_jax.policy.tokenizer import Tokenizer

# The `default` template, spelled out here independently of posi_jax: system text, separator, prompt turn.
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
TOXIC = "weird and disturbing portrait of a man covered in blood, gore, art by francis bacon"
CLEAN = "Unique and intriguing portrait of a man in red light, art by Francis Bacon."


def upstream_ids(sp, instruction: str, query_input: str, output: str | None = None, cutoff: int = 1024):
    """LLaMA-Factory's single-turn encoding with the default template: (source ids, target ids).
    source = BOS + sp(system) + sp("\\n") + sp("Human: " + query + "\\nAssistant:"), each piece encoded on its own
    (SentencePiece adds its dummy-prefix "▁" to each); query = instruction + "\\n" + input when the input is not empty;
    target = sp(output) + EOS. An over-long pair keeps int(cutoff * len(target) / total) target tokens (at least 1) and
    the rest of the cutoff for the source, each cut at its end (preprocess.py infer_max_len)."""
    query = instruction + "\n" + query_input if query_input else instruction
    source = [sp.bos_id()] + sp.encode(SYSTEM) + sp.encode("\n") + sp.encode("Human: " + query + "\nAssistant:")
    if output is None:
        return source, None
    target = sp.encode(output) + [sp.eos_id()]
    if len(source) + len(target) > cutoff:
        keep_target = max(int(cutoff * (len(target) / (len(source) + len(target)))), 1)
        source, target = source[:cutoff - keep_target], target[:keep_target]
    return source, target


@pytest.fixture(scope="module")
def llama_tok(llama_folder):
    return Tokenizer.from_folder(llama_folder)


def test_llama_tokenizer_has_no_chat_template_and_gets_the_default_format(llama_tok, smollm2_tokenizer):
    assert llama_tok.chat_template is None and llama_tok.bos_id == 1 and llama_tok.eos_ids == (2,)
    assert llama_tok.pad_id == 2  # no pad token: pad = EOS, as LLaMA-Factory sets it
    assert template_of(llama_tok) == "default"
    assert template_of(smollm2_tokenizer) == "chat"  # SmolLM2 keeps its own chat template
    with pytest.raises(PosiError, match="'chat' needs a tokenizer with a chat template"):
        use_template(Tokenizer.from_folder(llama_tok_folder_of(llama_tok)), "chat")
    with pytest.raises(PosiError, match="is not one of auto, chat, default"):
        use_template(llama_tok, "alpaca")


def llama_tok_folder_of(tok):  # a fresh tokenizer object each time (use_template mutates its argument)
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    tok.save(folder)
    return folder


@pytest.mark.parametrize("with_input", [True, False])
def test_prompt_and_sft_label_ids_equal_the_hand_built_reference(llama_tok, sentencepiece, with_input):
    sp = sentencepiece
    query_input = TOXIC if with_input else ""
    want_source, want_target = upstream_ids(sp, POSI_INSTRUCTION, query_input, CLEAN)
    ex = encode_example(llama_tok, PosiRecord(POSI_INSTRUCTION, query_input, CLEAN), cutoff_len=1024)
    assert ex.ids.tolist() == want_source + want_target
    assert ex.loss_mask.tolist() == [False] * len(want_source) + [True] * len(want_target)
    assert ex.ids[0] == sp.bos_id() and ex.ids[-1] == sp.eos_id()
    assert sp.decode(ex.ids[~ex.loss_mask].tolist()) == f"{SYSTEM} \n Human: {POSI_INSTRUCTION}" + \
        (f"\n{TOXIC}" if with_input else "") + "\nAssistant:"  # the pieces' dummy prefixes decode as spaces
    if with_input:  # the rewriter's / PPO's request for a user prompt: the same source ids
        assert request_ids(llama_tok, POSI_INSTRUCTION, "  " + TOXIC + "\n", 256) == want_source
    else:
        from posi_jax.policy.chat import prompt_ids

        assert prompt_ids(llama_tok, POSI_INSTRUCTION, "") == want_source


def test_sft_truncation_follows_llama_factory(llama_tok, sentencepiece):
    record = PosiRecord(POSI_INSTRUCTION, TOXIC, CLEAN)
    full = len(encode_example(llama_tok, record, 1024).ids)
    for cutoff in (full - 1, full - 25, 40):
        source, target = upstream_ids(sentencepiece, POSI_INSTRUCTION, TOXIC, CLEAN, cutoff=cutoff)
        ex = encode_example(llama_tok, record, cutoff)
        assert ex.ids.tolist() == source + target and int(ex.loss_mask.sum()) == len(target), cutoff
        assert len(ex.ids) <= cutoff


def test_response_text_decodes_like_sentencepiece(llama_tok, sentencepiece):
    ids = sentencepiece.encode(CLEAN)
    tokens = np.array(ids + [2, 2, 2])
    mask = np.array([True] * (len(ids) + 1) + [False, False])
    assert response_text(llama_tok, tokens, mask) == sentencepiece.decode(ids) == CLEAN


def test_the_format_travels_with_an_adapter_and_an_export(tmp_path, tiny_llama_folder):
    """A model trained with `default` on a tokenizer that has a chat template (SmolLM2's): the adapter records the
    format and loading it back uses it; an exported folder keeps it in tokenizer_config.json."""
    from posi_jax.nn.lora import add_lora
    from posi_jax.policy.adapters import save_adapter
    from posi_jax.policy.chat import default_prompt_ids
    from posi_jax.policy.load import load_adapter_policy, load_base_policy
    from posi_jax.policy.rewriter import Rewriter
    from posi_jax.weights.llama import save_llama_safetensors

    model, tok = load_base_policy(tiny_llama_folder)
    assert template_of(tok) == "chat"
    assert use_template(tok, "default") == "default"
    add_lora(model, ("q_proj", "v_proj"), rank=2, alpha=4.0)
    save_adapter(model, tmp_path / "adapter", targets=("q_proj", "v_proj"), rank=2, alpha=4.0, dropout=0.0,
                 base=str(tiny_llama_folder), extra={"template": template_of(tok)})
    loaded_model, loaded = load_adapter_policy(tmp_path / "adapter")
    assert template_of(loaded) == "default"
    want = default_prompt_ids(loaded, POSI_INSTRUCTION, TOXIC)
    assert Rewriter(loaded_model, loaded).chat_tokens(TOXIC) == want
    from posi_jax.nn.lora import merge_lora

    save_llama_safetensors(merge_lora(loaded_model), tmp_path / "export", loaded)
    assert template_of(Tokenizer.from_folder(tmp_path / "export")) == "default"
    _, plain = load_base_policy(tiny_llama_folder)
    assert template_of(plain) == "chat"  # nothing recorded: the automatic choice
