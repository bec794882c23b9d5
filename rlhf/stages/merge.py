"""`rlhf merge ADAPTER_DIR OUT_DIR`: fold a LoRA (or IA3 / LN-tuning) adapter into its base model.

The output is an ordinary transformers model directory (safetensors + tokenizer) that loads with
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` and needs neither peft nor the base.
A QLoRA adapter is merged into the base loaded in full precision (merging into 4-bit weights would
round the update away), which is the usual way to deploy QLoRA.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rlhf.errors import ArgumentParser, UserError

MERGEABLE = {"LORA", "IA3", "LN_TUNING"}


def merge(adapter_dir: str, out_dir: str, base: str | None = None, dtype: str = "auto",
          allow_pickle_weights: bool = False, option: str = "--allow_pickle_weights") -> Path:
    """Write the adapter folded into its base to out_dir. `option` names the opt-in to pickle weights in
    the refusal (the CLI flag, or the config field of the stage that merges)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from policies.models import LOAD_ERRORS, check_json_files, load_failure, read_json, refuse_pickle_weights

    adapter, out = Path(adapter_dir), Path(out_dir)
    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.exists():
        raise UserError(f"ADAPTER_DIR '{adapter}' holds no adapter_config.json (is it a peft adapter directory?)")
    from rlhf.runtime.outputs import check_output_dir

    check_output_dir(out, "OUT_DIR", inputs=(adapter,))
    if out.exists() and any(out.iterdir()):
        raise UserError(f"OUT_DIR '{out}' exists and is not empty; choose a new directory")
    adapter_cfg = read_json(cfg_file)
    peft_type = adapter_cfg.get("peft_type", "?")
    if peft_type not in MERGEABLE:
        raise UserError(f"a {peft_type} adapter cannot be merged into the weights (virtual tokens are not "
                        f"weights); mergeable types: {', '.join(sorted(MERGEABLE))}")
    base = base or adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{cfg_file}: no base_model_name_or_path; pass --base")
    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    for weights in (str(adapter), base):  # unpickling can run code: safetensors only unless asked
        refuse_pickle_weights(weights, allow_pickle_weights, option)
        check_json_files(weights)  # peft and transformers read them with a traceback, or without naming them
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype, trust_remote_code=False,
                                                     use_safetensors=None if allow_pickle_weights else True)
    except LOAD_ERRORS as e:
        raise UserError(f"base model '{base}' could not be loaded ({load_failure(e)}); pass --base") from None
    try:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except LOAD_ERRORS as e:
        raise UserError(f"ADAPTER_DIR '{adapter}' could not be loaded ({load_failure(e)})") from None
    tokenizer = AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer_config.json").exists() else base,
                                              trust_remote_code=False)

    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(tmp, out)  # the whole directory appears at once
    return out


def cli(argv: list[str]) -> None:
    p = ArgumentParser(prog="rlhf merge", description=__doc__.split("\n\n")[0])
    p.add_argument("adapter_dir", help="directory of a trained LoRA/IA3/LN-tuning adapter (an SFT output)")
    p.add_argument("out_dir", help="new directory for the merged full model")
    p.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the merged weights (default: the base's)")
    p.add_argument("--allow_pickle_weights", action="store_true",
                   help="load .bin (pickle) weights when there are no safetensors; unpickling can run code")
    args = p.parse_args(argv)
    out = merge(args.adapter_dir, args.out_dir, args.base, args.dtype, args.allow_pickle_weights)
    print(f"merged {args.adapter_dir} into {out}")
