"""CLIP BPE tokenizer: identical ids to open_clip.tokenize (open_clip vocab + cleaning) and to transformers'
CLIPTokenizer on a tokenizer/ folder, on varied strings including unicode and over-long text."""
import gzip
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from posi_jax.models.clip_tokenizer import EOT, SOT, CLIPTokenizer, _bytes_to_unicode
from posi_jax.errors import PosiError

TEXTS = [
    "a photo of a cat",
    "Hello, World!!!",
    "it's 2024 & I'm   here",
    "don't won't y'all they've we'd",
    "café naïve résumé Ångström",
    "日本語のテキストと中文",
    "emoji 🤖🎨 art 👩‍👩‍👧",
    "&amp; html &lt;b&gt; entities",
    "“curly quotes” and ‘single’ — dashes…",
    "ﬁne ligature ＦＵＬＬＷＩＤＴＨ",
    "ΣΑΣ Greek ΟΔΟΣ",
    "tabs\tand\nnewlines\r\n  spaces",
    "12345.678 3.14e-10 #hashtag @user",
    "Mixed CASE Text With Names: Van Gogh, Picasso",
    "a nude woman, highly detailed, 8k, trending on artstation",
    "",
    "   ",
    "x" * 300,
    " ".join(["word"] * 100),
    "a very long prompt, " * 30 + "the end",
]


def _open_clip_bpe_path():
    spec = importlib.util.find_spec("open_clip")
    return os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """A `tokenizer/` folder (vocab.json + merges.txt) written from open_clip's merges file, as SD folders ship it."""
    folder = tmp_path_factory.mktemp("tokenizer")
    merges = gzip.open(_open_clip_bpe_path()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [SOT, EOT]
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return str(folder)


def test_matches_open_clip_tokenize():
    import open_clip

    ours = CLIPTokenizer.from_open_clip()(TEXTS)
    ref = open_clip.tokenize(TEXTS).numpy()
    assert ours.dtype == np.int32 and ours.shape == (len(TEXTS), 77)
    for text, a, b in zip(TEXTS, ours, ref):
        np.testing.assert_array_equal(a, b, err_msg=repr(text))
    # over-long texts are cut to 77 and still end with EOT; padding is 0
    assert ours[-3, -1] == 49407 and ours[-3, 0] == 49406
    assert (ours[0, 7:] == 0).all()


def test_matches_transformers_clip_tokenizer(tokenizer_folder):
    import transformers

    ref_tok = transformers.CLIPTokenizer.from_pretrained(tokenizer_folder)
    ours_tok = CLIPTokenizer.from_folder(tokenizer_folder)
    ref = ref_tok(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
    ours = ours_tok(TEXTS)
    for text, a, b in zip(TEXTS, ours, ref):
        np.testing.assert_array_equal(a, b, err_msg=repr(text))
    assert ours_tok.pad_token_id == 49407  # SD v1 tokenizer folders pad with <|endoftext|>


@pytest.fixture(scope="module")
def saved_tokenizer_folder(tokenizer_folder, tmp_path_factory):
    """The same tokenizer as the installed transformers saves it: tokenizer.json + tokenizer_config.json only."""
    import transformers

    folder = tmp_path_factory.mktemp("saved_tokenizer")
    transformers.CLIPTokenizer.from_pretrained(tokenizer_folder).save_pretrained(str(folder))
    assert (folder / "tokenizer.json").is_file()
    assert not (folder / "vocab.json").exists() and not (folder / "merges.txt").exists()
    return str(folder)


def test_folder_saved_by_transformers_matches_reference_and_legacy_layout(saved_tokenizer_folder, tokenizer_folder,
                                                                          tmp_path):
    import transformers

    ref = transformers.CLIPTokenizer.from_pretrained(saved_tokenizer_folder)(
        TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
    saved = CLIPTokenizer.from_folder(saved_tokenizer_folder)
    legacy = CLIPTokenizer.from_folder(tokenizer_folder)
    assert (saved.vocab_size, saved.pad_token_id, saved.context_length) == (49408, 49407, 77)
    for text, a, b, c in zip(TEXTS, saved(TEXTS), ref, legacy(TEXTS)):
        np.testing.assert_array_equal(a, b, err_msg=repr(text))
        np.testing.assert_array_equal(a, c, err_msg=repr(text))
    # tokenizers up to 0.19 wrote merges as "a b" strings rather than [a, b] pairs: the same tokenizer
    data = json.loads((Path(saved_tokenizer_folder) / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    np.testing.assert_array_equal(CLIPTokenizer.from_folder(str(tmp_path))(TEXTS), saved(TEXTS))


def test_clip_checkpoint_tokenizer_in_either_layout(saved_tokenizer_folder, tokenizer_folder, tmp_path):
    """evaluation.scoring.load_clip_tokenizer: the folder's own tokenizer (in it or in tokenizer/), whatever its layout;
    OpenAI's BPE only for a checkpoint with no tokenizer files."""
    import shutil

    from posi_jax.evaluation.scoring import load_clip_tokenizer

    want = CLIPTokenizer.from_folder(tokenizer_folder)(TEXTS)
    shutil.copytree(saved_tokenizer_folder, tmp_path / "clip" / "tokenizer")
    for folder in (saved_tokenizer_folder, tokenizer_folder, tmp_path / "clip"):
        tok = load_clip_tokenizer(folder)
        assert tok.clean == "hf"
        np.testing.assert_array_equal(tok(TEXTS), want)
    assert load_clip_tokenizer(tmp_path / "ViT-B-32.pt").clean == "open_clip"


def test_folder_pad_token_and_context_length(tokenizer_folder, tmp_path):
    import shutil

    folder = tmp_path / "tok2"
    shutil.copytree(tokenizer_folder, folder)
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))  # SD v2 convention
    tok = CLIPTokenizer.from_folder(str(folder))
    assert tok.pad_token_id == 0
    ids = tok(["a cat"], context_length=10)
    assert ids.shape == (1, 10)
    np.testing.assert_array_equal(ids[0, 4:], 0)
    long = tok(["word " * 50], context_length=10)
    assert long[0, 0] == 49406 and long[0, -1] == 49407


def test_bad_inputs(tmp_path):
    with pytest.raises(PosiError, match="vocab.json"):
        CLIPTokenizer.from_folder(str(tmp_path))
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(PosiError, match="invalid JSON"):
        CLIPTokenizer.from_folder(str(tmp_path))
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(PosiError, match=r"pad token '<\|endoftext\|>' is not in the vocabulary \(.*vocab\.json\)"):
        CLIPTokenizer.from_folder(str(tmp_path))
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab</w>": 2, EOT: 3}))
    with pytest.raises(PosiError, match=r"no <\|startoftext\|> token"):
        CLIPTokenizer.from_folder(str(tmp_path))
    wordpiece = tmp_path / "wordpiece"
    wordpiece.mkdir()
    (wordpiece / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}))
    with pytest.raises(PosiError, match="not a BPE tokenizer"):
        CLIPTokenizer.from_folder(str(wordpiece))
    bad = tmp_path / "bpe.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(PosiError, match="cannot read BPE merges"):
        CLIPTokenizer.from_bpe_file(str(bad))
    tok = CLIPTokenizer.from_open_clip()
    with pytest.raises(PosiError, match="must be strings"):
        tok([1, 2])
