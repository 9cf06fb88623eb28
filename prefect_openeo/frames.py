"""Small dataframe helpers shared by the job databases, the engine and its lanes."""

from __future__ import annotations

import warnings
from typing import Any

import pandas as pd


def blank(value: Any) -> bool:
    """Whether a cell holds nothing (None, NaN, empty string)."""
    return value is None or (isinstance(value, float) and pd.isna(value)) or value == ""


def set_cell(df: pd.DataFrame, index: Any, column: str, value: Any) -> None:
    """Set one cell, adding the column (as objects) or widening its dtype when a value would not fit."""
    if column not in df.columns:
        df[column] = pd.Series([None] * len(df), index=df.index, dtype=object)
    elif df[column].dtype != object and not (
        isinstance(value, (int, float)) and pd.api.types.is_numeric_dtype(df[column].dtype)
    ):
        df[column] = df[column].astype(object)
    df.at[index, column] = value


def column(df: pd.DataFrame, name: str) -> pd.Series:
    """A column, or an all-empty one when the frame lacks it."""
    return df[name] if name in df.columns else pd.Series([None] * len(df), index=df.index, dtype=object)


def stack(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """Rows of both frames (their columns may differ, or be all empty in one of them)."""
    if second.empty:
        return first
    if first.empty:
        return second.copy()
    with warnings.catch_warnings():  # pandas' notice about all-NA columns in concat: the result is what we want
        warnings.simplefilter("ignore", FutureWarning)
        return pd.concat([first, second])
