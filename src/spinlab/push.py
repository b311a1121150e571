"""Publish a run's finished rounds on the Hugging Face Hub, each with its model and data cards:

    python -m spinlab.push <run_dir> --repo <owner/name> [--rounds 0,2] [--layout repos|revisions]

Round t goes to `<owner/name>-iter<t>` (`--layout repos`, the official SPIN release's naming:
UCLA-AGI/zephyr-7b-sft-full-SPIN-iter0 ... iter3), or to the branch `iter<t>` of `<owner/name>`
(`--layout revisions`). Its synthetic data goes to a dataset repository of the same name
(`--data-repo` another, `--no-data` none). What is uploaded is a list made here, file by file:
the files of `hf/round_XXX/` and the round's `synthetic.jsonl` and `stats.json`, each with a card
that names the repositories; nothing else of the run directory (checkpoints, logs, settings,
lock, W&B id). `--dry-run` prints that list and writes missing local cards, with no network.

Everything is checked before the first request: the hub reachable in principle (not
HF_HUB_OFFLINE) and a token, the rounds finished, their files present, a LoRA round's base model
known by a hub id.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spinlab.cards import (
    CARD,
    CardError,
    Publication,
    Run,
    dataset_card,
    model_card,
    start_model,
    write_dataset_card,
    write_model_card,
)

EXIT_REFUSED = 2
EXIT_FAILED = 1
TRUE = {"1", "ON", "YES", "TRUE"}
# Config files whose text would carry a local path of this machine, checked before upload.
TEXT_SUFFIXES = (".json", ".jinja", ".md", ".txt", ".yaml", ".yml")
# The mark of huggingface_hub's default card template, which peft fills in when it saves adapters.
PLACEHOLDER = "[More Information Needed]"


class PushError(ValueError):
    """A push that cannot start: one line, naming what to do."""


@dataclass
class Upload:
    """One commit: files (path in the repository -> a local file, or the bytes of a card)."""

    round: int
    kind: str  # "model" | "dataset"
    repo_id: str
    revision: str | None
    files: dict[str, Path | bytes] = field(default_factory=dict)

    @property
    def url(self) -> str:
        prefix = "datasets/" if self.kind == "dataset" else ""
        return f"https://huggingface.co/{prefix}{self.repo_id}" + (
            f"/tree/{self.revision}" if self.revision else ""
        )


def check_hub() -> None:
    """The hub may be asked: not offline, and a token to write with."""
    from huggingface_hub import constants, get_token

    offline = any(os.environ.get(v, "").upper() in TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if offline or constants.HF_HUB_OFFLINE:
        raise PushError(
            "the hub is offline (HF_HUB_OFFLINE=1 is set): unset it to push, or add --dry-run to list "
            "what would be uploaded"
        )
    if get_token() is None:
        raise PushError(
            "no Hugging Face token: run `hf auth login` or set HF_TOKEN to a token with write access"
        )


def parse_rounds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        rounds = sorted({int(part) for part in text.replace(",", " ").split()})
    except ValueError:
        raise PushError(f"--rounds {text!r}: give round indices, e.g. --rounds 0,2") from None
    if not rounds:
        raise PushError("--rounds is empty: give round indices, e.g. --rounds 0,2")
    return rounds


def _check_repo_id(repo_id: str, option: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PushError(f"{option}: {str(err).splitlines()[0]}") from None


def _model_files(folder: Path) -> dict[str, Path]:
    """Every file save_pretrained wrote; not hidden files or leftovers of an interrupted save."""
    return {
        p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and not p.name.endswith((".tmp", ".old"))
    }


def _placeholder(path: Path) -> bool:
    """A card that is only huggingface_hub's template, as peft saves one with every adapter."""
    return path.is_file() and PLACEHOLDER in path.read_text(errors="replace")


def _card_bytes(local: Path, generated_here, for_hub) -> bytes:
    """The card to upload: the one made for the hub, unless the local card is not the one
    spinlab makes from the run directory (edited by hand, or made by another version), which
    then goes up as it is."""
    if local.is_file() and not _placeholder(local) and local.read_bytes() != str(generated_here).encode():
        print(
            f"{local} differs from the card spinlab makes now (edited, or made by another version): "
            "uploading it as it is; delete it to upload a fresh one",
            file=sys.stderr,
        )
        return local.read_bytes()
    return str(for_hub).encode()


def _leaks(upload: Upload, run: Run) -> None:
    """Refuse config text that names a local path of this machine (the run directory, $HOME)."""
    marks = {str(run.dir.root.resolve()), str(Path.home())} - {"/"}
    for name, content in upload.files.items():
        if upload.kind == "dataset" and name != CARD:
            continue  # the data is what it is; the user chose it
        if not name.endswith(TEXT_SUFFIXES):
            continue
        text = content.decode() if isinstance(content, bytes) else content.read_text(errors="replace")
        found = next((m for m in marks if m in text), None)
        if found:
            raise PushError(
                f"round {upload.round}: {name} would upload the local path {found!r}; remove it from "
                f"{run.dir.hf(upload.round) / name if upload.kind == 'model' else name} first"
            )


def plan(run: Run, publication: Publication, rounds: list[int] | None) -> list[Upload]:
    """What a push uploads, round by round (data first: the model card links to it)."""
    finished = run.finished
    if not finished:
        raise PushError(
            f"{run.dir.root} has no finished round yet ({run.dir.summary} lists none): nothing to push"
        )
    rounds = finished if rounds is None else rounds
    missing = [r for r in rounds if r not in finished]
    if missing:
        raise PushError(
            f"round {missing[0]} is not a finished round of {run.dir.root} (finished: "
            f"{', '.join(map(str, finished))}); choose --rounds among them"
        )
    uploads = []
    for index in rounds:
        folder = run.dir.hf(index)
        files = _model_files(folder) if folder.is_dir() else {}
        if "config.json" not in files and "adapter_config.json" not in files:
            raise PushError(f"{folder} holds no saved model (no config.json or adapter_config.json)")
        data_path = run.dir.synthetic(index)
        if publication.data_repo and data_path.is_file():
            repo, revision = publication.data(index)
            upload = Upload(index, "dataset", repo, revision, {"synthetic.jsonl": data_path})
            if run.dir.round_stats(index).is_file():
                upload.files["stats.json"] = run.dir.round_stats(index)
            upload.files[CARD] = _card_bytes(
                run.dir.round_dir(index) / CARD,
                dataset_card(run, index),
                dataset_card(run, index, publication),
            )
            upload.files = dict(sorted(upload.files.items()))
            uploads.append(upload)
        repo, revision = publication.model(index)
        upload = Upload(index, "model", repo, revision, {k: v for k, v in files.items() if k != CARD})
        if "adapter_config.json" in files:
            upload.files["adapter_config.json"] = _adapter_config(run, index, publication, files)
        upload.files[CARD] = _card_bytes(
            folder / CARD, model_card(run, index), model_card(run, index, publication)
        )
        upload.files = dict(sorted(upload.files.items()))
        uploads.append(upload)
    for upload in uploads:
        _leaks(upload, run)
    return uploads


def _adapter_config(run: Run, index: int, publication: Publication, files: dict[str, Path]) -> bytes:
    """A LoRA round's adapter_config.json naming its base model by hub id (locally it names the
    directory the base model was loaded from), so the adapter loads from the hub alone."""
    base, words = start_model(run, publication.base_model)
    if base is None:
        raise PushError(
            f"round {index} is a LoRA adapter on {words}, which has no hub id: give the base model's "
            "hub id with --base-model"
        )
    config = json.loads(files["adapter_config.json"].read_text())
    config["base_model_name_or_path"] = base
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def write_local_cards(run: Run, rounds: list[int]) -> list[Path]:
    """The local cards of rounds that lack them (a run made before cards were written), or hold
    only a placeholder; a card of another making is left as it is."""
    written = []
    for index in rounds:
        model = run.dir.hf(index) / CARD
        if not model.is_file() or _placeholder(model):
            written.append(write_model_card(run.dir.root, index))
        data = run.dir.round_dir(index) / CARD
        if run.dir.synthetic(index).is_file() and not data.is_file():
            written.append(write_dataset_card(run.dir.root, index))
    return written


def stage(upload: Upload, folder: Path) -> None:
    """The upload's files under `folder`: links to the run's files, the cards written out."""
    for name, content in upload.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.symlink_to(content.resolve())


def upload_all(uploads: list[Upload], private: bool, api=None) -> None:
    """Every card validated by the Hub first, so that a card it refuses stops the push before
    anything is uploaded; then each round's repositories (and branches) created if missing, and
    one commit each."""
    from huggingface_hub import DatasetCard, HfApi, ModelCard

    for upload in uploads:
        card = (ModelCard if upload.kind == "model" else DatasetCard)(upload.files[CARD].decode())
        try:
            card.validate()
        except Exception as err:
            raise RuntimeError(
                f"the Hub refused the card of round {upload.round} ({upload.kind}): "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; nothing was pushed"
            ) from err
    api = api or HfApi()
    made: set[tuple[str, str]] = set()
    done: list[str] = []
    for upload in uploads:
        try:
            if (upload.repo_id, upload.kind) not in made:
                api.create_repo(upload.repo_id, repo_type=upload.kind, private=private or None, exist_ok=True)
                made.add((upload.repo_id, upload.kind))
            if upload.revision:
                api.create_branch(
                    upload.repo_id, repo_type=upload.kind, branch=upload.revision, exist_ok=True
                )
            with tempfile.TemporaryDirectory(prefix="spinlab-push-") as tmp:
                stage(upload, Path(tmp))
                api.upload_folder(
                    repo_id=upload.repo_id,
                    repo_type=upload.kind,
                    folder_path=tmp,
                    revision=upload.revision,
                    commit_message=f"spinlab: round {upload.round} (iter{upload.round}), {upload.kind}",
                )
        except Exception as err:
            pushed = f"; pushed before it: {', '.join(done)}" if done else "; nothing was pushed"
            raise RuntimeError(
                f"push of round {upload.round} ({upload.kind}) to {upload.repo_id} failed: "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}{pushed}"
            ) from err
        done.append(upload.url)
        print(f"round {upload.round}: {upload.kind} -> {upload.url} ({len(upload.files)} files)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spinlab.push",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, help="the run directory (outputs/<name>/<overrides>)")
    parser.add_argument("--repo", required=True, help="owner/name: round t goes to owner/name-iter<t>")
    parser.add_argument(
        "--rounds", default=None, help="round indices, e.g. 0,2 (default: every finished round)"
    )
    parser.add_argument(
        "--layout",
        choices=("repos", "revisions"),
        default="repos",
        help="repos: one repository per round, <repo>-iter<t>; revisions: one repository, branch iter<t>",
    )
    parser.add_argument(
        "--data-repo", default=None, help="the synthetic data's dataset repository (default: --repo)"
    )
    parser.add_argument("--no-data", action="store_true", help="push the models only")
    parser.add_argument(
        "--base-model", default=None, help="the start model's hub id, for a run from a local directory"
    )
    parser.add_argument("--license", default=None, help="a Hub license id for the cards, e.g. apache-2.0")
    parser.add_argument("--private", action="store_true", help="create missing repositories as private")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; no network")
    args = parser.parse_args(argv)
    try:
        if not args.dry_run:
            check_hub()
        publication = Publication(
            repo=args.repo,
            data_repo=None if args.no_data else (args.data_repo or args.repo),
            layout=args.layout,
            base_model=args.base_model,
            license=args.license,
        )
        rounds = parse_rounds(args.rounds)
        for index in rounds or [0]:
            _check_repo_id(publication.model(index)[0], "--repo")
            if publication.data_repo:
                _check_repo_id(publication.data(index)[0], "--data-repo")
        if args.base_model:
            _check_repo_id(args.base_model, "--base-model")
        if not args.run_dir.is_dir():
            raise PushError(
                f"{args.run_dir} is not a directory: give a run directory (outputs/<name>/<overrides>)"
            )
        run = Run(args.run_dir)
        uploads = plan(run, publication, rounds)
        for path in write_local_cards(run, sorted({u.round for u in uploads})):
            print(f"wrote {path}", file=sys.stderr)
    except (PushError, CardError) as err:
        print(f"refused: {err}", file=sys.stderr)
        return EXIT_REFUSED
    if args.dry_run:
        for upload in uploads:
            print(f"round {upload.round}: {upload.kind} -> {upload.url}")
            for name, content in upload.files.items():
                size = len(content) if isinstance(content, bytes) else content.stat().st_size
                print(f"  {name} ({size} bytes)")
        return 0
    try:
        upload_all(uploads, args.private)
    except RuntimeError as err:
        print(f"failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
