"""Rows from a table model: new rows, rows conditioned on some columns, and imputation of missing cells.

Seeds: row i of a request draws every random number from its own `torch.Generator().manual_seed(seed + i)`
(imputation: draw k of row j from seed + j * draws + k), and the network always runs on `micro_batch` rows
(the last batch padded), so row 3 of n=10 is bitwise row 3 of n=100. `--condition col=value` is imputation
of rows where only those columns are known. Known cells are held fixed while sampling
(`sdpipe.tabular.diffusion.sample`) and copied back exactly, so they come out unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from sdpipe.tabular.diffusion import Known, NoiseBank, sample
from sdpipe.tabular.preprocess import EncodedTable

if TYPE_CHECKING:
    import pandas as pd

    from sdpipe.tabular.train import TableModel

MICRO_BATCH = 256
INTERVAL = (0.025, 0.975)  # the per-cell interval of imputed numbers: these quantiles of the draws


class Imputation(NamedTuple):
    frame: pd.DataFrame  # the input with its missing cells filled (numbers: the median draw; categories: the mode)
    cells: pd.DataFrame  # one row per filled cell: row, column, value, low, high (numbers), shares (categories)
    draws: list[pd.DataFrame]  # each draw's filled frame


def _pad(t: torch.Tensor, pad: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t


def sample_encoded(
    model: TableModel, seeds: list[int], known: Known, micro_batch: int = MICRO_BATCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Numbers (N, Dn) and categories (N, C), on the CPU, for one seed per row; `known` (N rows) held fixed."""
    d, device = model.diffusion, model.device
    steps = model.config.sample_steps
    numeric, tokens = [], []
    for start in range(0, len(seeds), micro_batch):
        part = seeds[start : start + micro_batch]
        pad = micro_batch - len(part)
        bank = NoiseBank.draw([torch.Generator().manual_seed(s) for s in part], steps, d.gaussian_width, len(d.sizes))
        bank = NoiseBank(_pad(bank.start, pad), *(_pad(v.transpose(0, 1), pad).transpose(0, 1) for v in
                         (bank.noise, bank.known_noise, bank.unmask, bank.pick)))  # fmt: skip
        rows = Known(*(_pad(getattr(known, f.name)[start : start + len(part)], pad).to(device) for f in fields(Known)))
        x, c = sample(model.denoiser, d, bank.to(device), rows, steps)
        numeric.append(x[: len(part)].cpu())
        tokens.append(c[: len(part)].cpu())
    if not seeds:
        return torch.zeros(0, d.numeric_width), torch.zeros(0, len(d.sizes), dtype=torch.long)
    return torch.cat(numeric), torch.cat(tokens)


def _decode(model: TableModel, numeric: torch.Tensor, tokens: torch.Tensor) -> pd.DataFrame:
    pre = model.preprocessor
    return pre.decode(EncodedTable(numeric, tokens, pre.category_sizes))


def _put(target: pd.DataFrame, positions: np.ndarray, name: str, values: pd.Series) -> None:
    """Set the cells of column `name` at row `positions` of `target` to `values` (a Series keeps its dtype)."""
    values = values.reset_index(drop=True)
    values.index = target.index[positions]
    target.loc[values.index, name] = values


def generate_rows(
    model: TableModel,
    n: int,
    seed: int = 0,
    condition: Mapping[str, Any] | None = None,
    micro_batch: int = MICRO_BATCH,
) -> pd.DataFrame:
    """`n` new rows with the source's columns and dtypes; with `condition` ({column: value}), every row
    carries those values and the other cells are drawn given them. A column the model does not know, or a
    category value it never saw in training, is a `ValueError` naming it."""
    known = _condition(model, n, condition) if condition else Known.nothing(n, *_layout(model), torch.device("cpu"))
    numeric, tokens = sample_encoded(model, [seed + i for i in range(n)], known, micro_batch)
    frame = _decode(model, numeric, tokens)
    for name, value in (condition or {}).items():
        frame[name] = frame[name].where(np.zeros(n, dtype=bool), value)  # exactly the asked value, same dtype
    return frame


def _layout(model: TableModel) -> tuple[int, list[int]]:
    return model.preprocessor.numeric_width, model.preprocessor.category_sizes


def _condition(model: TableModel, n: int, condition: Mapping[str, Any]) -> Known:
    """The known cells of `n` rows where only the `condition` columns are known."""
    pre = model.preprocessor
    specs = {c.name: c for c in pre.columns}
    for name in condition:
        if name not in specs:
            raise ValueError(f"unknown column {name!r} in the condition; the table's columns are {pre.names}")
        if specs[name].role not in ("number", "category"):
            raise ValueError(f"column {name!r} is a {specs[name].type} column, which the model does not generate")
    template = _decode(
        model, torch.zeros(n, pre.numeric_width), torch.zeros(n, len(pre.category_sizes), dtype=torch.long)
    )
    for name, value in condition.items():
        template[name] = template[name].astype(object).where(np.zeros(n, dtype=bool), value)
    try:
        enc = pre.encode(template)
    except Exception as err:  # PreprocessError names the column and the value
        raise ValueError(f"cannot condition on {dict(condition)}: {err}") from err
    known = Known.nothing(n, *_layout(model), torch.device("cpu"))
    known.numeric, known.tokens = enc.numeric, enc.categorical
    for name in condition:
        spec = specs[name]
        cats = [k for k in (spec.category, spec.missing, *spec.derived.values()) if k is not None]
        known.token_mask[:, cats] = True
        if spec.numeric is not None:
            assert enc.numeric_observed is not None
            known.numeric_mask[:, spec.numeric] = enc.numeric_observed[:, spec.numeric]
    return known


def impute(
    model: TableModel, frame: pd.DataFrame, draws: int = 10, seed: int = 0, micro_batch: int = MICRO_BATCH
) -> Imputation:
    """Fill the missing cells of the modelled columns of `frame`, each row drawn `draws` times conditioned on
    its observed cells (draw k of row j: seed + j * draws + k). Observed cells stay as they are."""
    import pandas as pd

    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    pre = model.preprocessor
    enc = pre.encode(frame)
    assert enc.observed is not None and enc.numeric_observed is not None and enc.categorical_observed is not None
    known = Known(
        enc.numeric, enc.numeric_observed.clone(), enc.categorical.clone(), enc.categorical_observed.clone(),
        torch.zeros(enc.rows, sum(pre.category_sizes), dtype=torch.bool),
    )  # fmt: skip
    offsets = np.cumsum([0, *pre.category_sizes])
    modelled = np.zeros(len(pre.columns), dtype=bool)
    for j, spec in enumerate(pre.columns):
        modelled[j] = spec.role in ("number", "category")
        if spec.missing is not None:  # a missing number is filled: its indicator says "present"
            known.tokens[:, spec.missing] = 0
        if spec.category is not None and spec.has_missing:  # nor is a missing category drawn
            known.forbid[:, offsets[spec.category + 1] - 1] = ~known.token_mask[:, spec.category]
    todo = ~enc.observed.numpy() & modelled
    rows = np.flatnonzero(todo.any(axis=1))
    seeds = [seed + int(j) * draws + k for j in rows for k in range(draws)]
    repeat = torch.as_tensor(np.repeat(rows, draws))
    numeric, tokens = sample_encoded(
        model, seeds, Known(*(getattr(known, f.name)[repeat] for f in fields(Known))), micro_batch
    )
    decoded = _decode(model, numeric, tokens)
    order = numeric.view(len(rows), draws, -1).argsort(dim=1).numpy()  # decoding is monotone in the numbers
    filled, cells = frame.copy(), []
    per_draw = [frame.copy() for _ in range(draws)]
    for j, spec in enumerate(pre.columns):
        hit = np.flatnonzero(todo[rows, j])
        if not len(hit):
            continue
        column = decoded[spec.name]
        base = hit * draws  # the first draw of each cell's row in `decoded`
        for k in range(draws):
            _put(per_draw[k], rows[hit], spec.name, column.iloc[base + k])
        if spec.numeric is not None:
            sort = order[hit, :, spec.numeric]
            low, high, mid = (base + sort[:, round(q * (draws - 1))] for q in (*INTERVAL, 0.5))
            chosen = mid
            found = (column.iloc[a].tolist() for a in (mid, low, high))
            cells += [(int(r), spec.name, *v, None) for r, *v in zip(rows[hit], *found, strict=True)]
        else:
            chosen = np.zeros(len(hit), dtype=np.int64)
            for i, (r, b) in enumerate(zip(rows[hit], base, strict=True)):
                shares = column.iloc[b : b + draws].value_counts(normalize=True, sort=True)
                chosen[i] = b + int(np.flatnonzero(column.iloc[b : b + draws].to_numpy() == shares.index[0])[0])
                cells.append((int(r), spec.name, shares.index[0], None, None, shares.to_dict()))
        _put(filled, rows[hit], spec.name, column.iloc[chosen])
    table = pd.DataFrame(cells, columns=["row", "column", "value", "low", "high", "shares"])
    return Imputation(filled, table, per_draw)
