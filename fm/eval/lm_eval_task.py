"""Write fm's multiple-choice items as a local lm-evaluation-harness task, so lm-eval scores an export as fm does.

    python -m fm.eval.lm_eval_task data/05_instructions/heldout.parquet data/07_export/hf data/08_eval/lm_eval --limit 200
    lm_eval --model hf --device cpu --include_path data/08_eval/lm_eval --tasks fm_heldout_mc \
        --model_args pretrained=data/07_export/hf,tokenizer=data/08_eval/lm_eval/tokenizer,dtype=float32,max_length=255

    from fm.eval.lm_eval_task import write_lm_eval_task          # or, from Python
    summary = write_lm_eval_task(rows, Path("data/07_export/hf"), Path("data/08_eval/lm_eval"))
    summary["model_args"]                                        # what --model_args must say (max_length included)

The folder written: fm_heldout_mc.yaml (the task), fm_heldout_mc.jsonl (one line per item: context,
choices, answer_index), tokenizer/ (the export's tokenizer with split_special_tokens false) and,
once lm-eval has run, datasets' cache. How the formats line up with fm.eval.choice.multiple_choice,
token for token (tests/test_lm_eval_parity.py checks it):

- context is the chat template written as text, "<|user|>" + prompt + "<|end|><|assistant|>", and
  each choice is option + "<|end|>", with target_delimiter "" (lm-eval's default " " would put a
  space token before every option). fm inserts the control tokens by id; for lm-eval's tokenizer to
  find them in the text it must match special tokens in text, which the export's tokenizer refuses
  (split_special_tokens true, as fm's own). Hence the tokenizer/ copy with split_special_tokens
  false, passed as tokenizer=...; an item whose text holds a special token's spelling would then be
  tokenized differently from fm, so such items are left out (counted in the summary).
- lm-eval's causal _encode_pair encodes context + continuation and splits at len(encode(context)).
  The context ends with the <|assistant|> token, which no merge crosses, so the split falls exactly
  where fm's (context ids, continuation ids) meet. The context has no trailing space to move.
- No BOS: the export's tokenizer adds nothing (add_bos_token false), as fm puts nothing before a prompt.
- Truncation: fm keeps the last max_len = seq_len tokens of context + continuation and feeds all but
  the last; lm-eval keeps max_length + 1 and feeds max_length. max_length = seq_len - 1 makes them equal.
- acc is the same rule as fm's accuracy (argmax of summed log-likelihoods, first of equals). lm-eval's
  acc_norm divides by the characters of the choice and acc_bytes by its UTF-8 bytes, both counting the
  "<|end|>" suffix (7); fm's accuracy_norm divides by the option's bytes alone, so those can differ.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from fm.data.chat import ASSISTANT, END, USER
from fm.data.tokenizer import SPECIAL_TOKENS
from fm.io import atomic_dir

TASK = "fm_heldout_mc"
TOKENIZER_FILES = ("tokenizer.json", "special_tokens_map.json")


def lm_eval_doc(prompt: str, options: list[str], answer_index: int) -> dict:
    """One item as the task's JSONL line: fm's chat template as text, each option closed by <|end|>."""
    return {"context": f"{USER}{prompt}{END}{ASSISTANT}", "choices": [f"{o}{END}" for o in options],
            "answer_index": int(answer_index)}


def task_yaml(task: str, data_file: Path, cache_dir: Path) -> str:
    """The lm-eval task config (YAML, written by hand: JSON strings are valid YAML scalars)."""
    return "\n".join([
        f"task: {task}",
        "dataset_path: json",
        "dataset_kwargs:",
        f"  data_files: {{test: {json.dumps(str(data_file))}}}",
        f"  cache_dir: {json.dumps(str(cache_dir))}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: answer_index",
        'target_delimiter: ""  # the context ends with <|assistant|>; fm puts no space before the answer',
        "metric_list:",
        *(f"  - {{metric: {m}, aggregation: mean, higher_is_better: true}}" for m in ("acc", "acc_norm", "acc_bytes")),
        "metadata: {version: 1.0}",
        "",
    ])


def write_lm_eval_task(items: list[dict], export_dir: Path, out_dir: Path, task: str = TASK) -> dict:
    """Write the lm-eval task folder out_dir for items (dicts with prompt, options, answer_index) against the
    fm.export.hf folder export_dir; return n, skipped, task, model_args and the lm_eval command."""
    export_dir, out_dir = Path(export_dir).resolve(), Path(out_dir).resolve()
    config = json.loads((export_dir / "config.json").read_text())
    tok_config = json.loads((export_dir / "tokenizer_config.json").read_text())
    docs, skipped = [], 0
    for k, item in enumerate(items):
        options = list(item["options"])
        if not options or not all(options):
            raise ValueError(f"item {k} has no options or an empty one (not a multiple-choice item)")
        if any(t in text for t in SPECIAL_TOKENS for text in (item["prompt"], *options)):
            skipped += 1  # lm-eval's tokenizer would read the spelling as the control token; fm reads it as text
            continue
        docs.append(lm_eval_doc(item["prompt"], options, item["answer_index"]))
    if not docs:
        raise ValueError(f"no items to write ({skipped} left out for spelling a special token)")
    with atomic_dir(out_dir) as tmp:
        with open(tmp / f"{task}.jsonl", "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        # Paths as they will be once the folder is in place.
        (tmp / f"{task}.yaml").write_text(task_yaml(task, out_dir / f"{task}.jsonl", out_dir / "datasets_cache"))
        (tmp / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            shutil.copyfile(export_dir / name, tmp / "tokenizer" / name)
        (tmp / "tokenizer" / "tokenizer_config.json").write_text(
            json.dumps({**tok_config, "split_special_tokens": False}, indent=2) + "\n")
    max_length = int(config["max_position_embeddings"]) - 1  # fm feeds at most seq_len - 1 positions
    model_args = f"pretrained={export_dir},tokenizer={out_dir / 'tokenizer'},dtype=float32,max_length={max_length}"
    command = (f"lm_eval --model hf --model_args {model_args} --include_path {out_dir} --tasks {task} "
               f"--device cpu --log_samples --output_path {out_dir / 'results'}")
    return {"n": len(docs), "skipped": skipped, "task": task, "model_args": model_args, "command": command}


def main(argv: list[str] | None = None) -> None:
    import pandas as pd

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("items", type=Path, help="a parquet of fm.data.instructions rows (those with options are used)")
    ap.add_argument("export_dir", type=Path, help="an fm.export.hf folder")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--limit", type=int, default=None, help="only the first N multiple-choice items")
    args = ap.parse_args(argv)
    rows = pd.read_parquet(args.items)
    rows = rows[rows["options"].notna()]
    if args.limit is not None:
        rows = rows.head(args.limit)
    summary = write_lm_eval_task(rows.to_dict("records"), args.export_dir, args.out_dir)
    json.dump(summary, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
