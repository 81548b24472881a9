"""Prompts: the taxonomy, the composer, user prompt files, LM expansion, the filter, the CLI."""

from __future__ import annotations

import json
import re

import pytest

from l2p.cli import main
from l2p.data import prompts as P


def test_taxonomy_sizes():
    tax = P.load_taxonomy()
    assert tax.major_classes == ["Nature", "Design", "People", "Text/Synthetic"]
    assert len(tax.sub_classes) == 17
    names = [c.name for c in tax.categories]
    assert len(names) >= 1000
    assert len({n.lower() for n in names}) == len(names), "leaf categories must be distinct"
    assert all(s.settings and s.details and s.categories for s in tax.sub_classes)
    assert tax.without_article <= set(names)


def test_composed_prompts_length_sentences_and_coverage():
    records = P.make_prompts(1200, seed=0)
    assert len(records) == 1200
    assert len({r.text for r in records}) == 1200
    for r in records:
        assert P.DEFAULT_MIN_CHARS <= len(r.text) <= P.DEFAULT_MAX_CHARS
        unquoted = re.sub(r'"[^"]*"', "QUOTE", r.text)
        assert 3 <= len(re.findall(r"[.!?](?:\s|$)", unquoted)) <= 5, r.text
        assert r.text[0].isupper() and r.text.endswith((".", '"'))
        assert r.source == "taxonomy" and r.category.count(" > ") == 2
    # The composer visits every leaf before repeating one.
    assert len({r.category for r in records[:1000]}) == 1000


def test_composer_is_deterministic_per_seed():
    a = [r.text for r in P.make_prompts(50, seed=7)]
    assert a == [r.text for r in P.make_prompts(50, seed=7)]
    assert a != [r.text for r in P.make_prompts(50, seed=8)]


def test_composer_respects_custom_bounds():
    f = P.PromptFilter(min_chars=260, max_chars=300)
    records = P.make_prompts(100, seed=1, prompt_filter=f)
    assert all(260 <= len(r.text) <= 300 for r in records)
    with pytest.raises(ValueError, match="min_chars"):
        P.PromptComposer(min_chars=300, max_chars=200)


def test_read_prompts_txt_csv_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("a red fox\n\n  a blue car  \n")
    (tmp_path / "p.csv").write_text('id,prompt\n1,"a red fox, running"\n2,a blue car\n')
    (tmp_path / "p.jsonl").write_text('{"text": "a red fox"}\n\n{"prompt": "a blue car"}\n"a tree"\n')
    assert P.read_prompts(tmp_path / "p.txt") == ["a red fox", "a blue car"]
    assert P.read_prompts(tmp_path / "p.csv") == ["a red fox, running", "a blue car"]
    assert P.read_prompts(tmp_path / "p.jsonl") == ["a red fox", "a blue car", "a tree"]
    (tmp_path / "bad.csv").write_text("caption\nx\n")
    with pytest.raises(ValueError, match="'text' or 'prompt' column"):
        P.read_prompts(tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        P.read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "p.tsv").write_text("a red fox\n")
    with pytest.raises(ValueError, match="unknown prompt file type"):
        P.read_prompts(tmp_path / "p.tsv")
    with pytest.raises(FileNotFoundError):
        P.read_prompts(tmp_path / "missing.txt")


BASE = ("A weathered lighthouse stands on a rocky headland above a grey sea. Waves break against "
        "the rocks below while gulls circle the lamp room. The scene is lit by soft, diffuse "
        "morning light. The image is a crisp large-format landscape photograph.")


def test_filter_length_malformed_block_and_duplicates():
    f = P.PromptFilter(block_words=["lighthouse keeper", "gore"])
    assert f.check(BASE) == BASE
    assert f.check("Too short.") is None
    assert f.check(BASE + " " + BASE) is None
    assert f.check("  " + BASE.replace("grey", "GREY") + "  ") is None  # same words: duplicate
    one_word = BASE.replace("gulls", "terns")
    assert f.check(one_word) is None  # near duplicate
    block = BASE.replace("A weathered lighthouse", "A lighthouse  keeper").replace("grey sea", "calm sea")
    assert f.check(block) is None
    # Word boundaries: "gorge" is not "gore".
    fine = ("A narrow gorge cuts through red sandstone under a pale sky. A river winds along its "
            "floor between boulders and willows. Warm late-afternoon light reaches the upper walls. "
            "The image is a detailed field-guide illustration.")
    assert f.check(fine) == fine
    malformed = fine.replace("narrow", 'narrow "quoted').replace("sandstone", "sand\x00stone")
    assert f.check(malformed) is None
    assert f.rejected == {"too_short": 1, "too_long": 1, "duplicate": 1, "near_duplicate": 1,
                          "blocked": 1, "malformed": 1}
    assert f.accepted == 2


def test_filter_keeps_composed_prompts_and_default_block_list():
    words = P.load_block_list()
    assert "nsfw" in words and all(w == w.lower() for w in words)
    f = P.PromptFilter(block_words=words)
    records = list(f(P.PromptRecord(r.text) for r in P.make_prompts(500, seed=3)))
    assert len(records) == 500 and not f.rejected


def test_custom_block_list_file(tmp_path):
    path = tmp_path / "block.txt"
    path.write_text("# comment\nLighthouse\n\n")
    assert P.load_block_list(path) == ["lighthouse"]
    assert P.PromptFilter(block_words=P.load_block_list(path)).check(BASE) is None


def test_expansion_with_a_local_model_path(tmp_path):
    from l2p.testing import build_tiny_causal_lm

    model = build_tiny_causal_lm(tmp_path / "lm")
    short = ["a red fox", "a blue car"]
    out = P.expand_prompts(short, model, seed=0, max_new_tokens=8, batch_size=2, device="cpu")
    assert [r.source for r in out] == ["expanded", "expanded"]
    assert out == P.expand_prompts(short, model, seed=0, max_new_tokens=8, batch_size=2, device="cpu")
    # A random model writes gibberish: the filter still applies and drops it.
    f = P.PromptFilter()
    assert list(f(out)) == [] and sum(f.rejected.values()) == 2
    with pytest.raises(FileNotFoundError, match="not a local transformers model folder"):
        P.expand_prompts(short, tmp_path / "no-such-model")


def test_cli_prompts_compose_and_input(tmp_path, capsys):
    out = tmp_path / "prompts.jsonl"
    assert main(["data", "prompts", "--num", "40", "--seed", "5", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 40 and all(set(r) == {"text", "source", "category"} for r in rows)
    assert "wrote 40 prompts" in capsys.readouterr().out

    block = tmp_path / "block.txt"
    block.write_text("lighthouse\n")
    src = tmp_path / "mine.txt"
    src.write_text(f"{BASE}\nshort\n{BASE.replace('lighthouse', 'windmill')}\n")
    out2 = tmp_path / "mine.jsonl"
    assert main(["data", "prompts", "--input", str(src), "--out", str(out2),
                 "--block-list", str(block)]) == 0
    kept = [json.loads(line)["text"] for line in out2.read_text().splitlines()]
    assert kept == [BASE.replace("lighthouse", "windmill")]
    assert "blocked 1" in capsys.readouterr().out
    assert main(["data", "prompts", "--out", str(out2)]) == 2  # --num missing: a user error


def test_csv_saved_with_a_bom_is_read(tmp_path):
    """Excel writes UTF-8 CSV with a byte order mark before the first column's name."""
    (tmp_path / "excel.csv").write_bytes("text,id\na red fox,1\n".encode("utf-8-sig"))
    assert P.read_prompts(tmp_path / "excel.csv") == ["a red fox"]


@pytest.mark.parametrize("num", ["0", "-3"])
def test_cli_prompts_refuses_num_below_one(tmp_path, capsys, num):
    out = tmp_path / "p.jsonl"
    assert main(["data", "prompts", "--num", num, "--out", str(out)]) == 2
    assert "--num must be at least 1" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_bom_does_not_become_part_of_the_first_prompt(tmp_path, suffix):
    """Notepad writes UTF-8 text files with a byte order mark first."""
    path = tmp_path / f"p{suffix}"
    lines = ["a red fox", "a blue car"] if suffix == ".txt" else ['{"text": "a red fox"}', '"a blue car"']
    path.write_bytes("\n".join(lines).encode("utf-8-sig"))
    assert P.read_prompts(path) == ["a red fox", "a blue car"]


@pytest.mark.parametrize("name, content", [("p.txt", "un caf\xe9\n"), ("p.csv", "text\nun caf\xe9\n"),
                                           ("p.jsonl", '"un caf\xe9"\n')])
def test_a_prompt_file_not_in_utf8_is_named(tmp_path, capsys, name, content):
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match=f"{name} is not UTF-8 text .*byte 0xe9.*save it with the UTF-8 encoding"):
        P.read_prompts(path)
    assert main(["data", "prompts", "--input", str(path), "--out", str(tmp_path / "out.jsonl")]) == 2
    assert f"{name} is not UTF-8" in capsys.readouterr().err


def test_a_quote_left_open_in_a_prompt_csv_is_an_error_not_merged_prompts(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('text\n"a red fox\na blue car\n')
    with pytest.raises(ValueError, match=r"p.csv line 2: unexpected end of data"):
        P.read_prompts(path)


def test_a_lone_surrogate_in_a_jsonl_prompt_is_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a red fox"}\n{"text": "a fox \\ud800 in the snow"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: the prompt holds '\\ud800', half of a UTF-16 pair"):
        P.read_prompts(path)
