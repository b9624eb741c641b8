"""Chat templates: the exact text fed to the model for each format."""

from __future__ import annotations

import pytest

from common.errors import InvalidArgument
from common.templates import get_template


def test_chat_template() -> None:
    t = get_template("chat")
    assert t.prefix("") == "" and t.prefix("Be brief.") == "System: Be brief.\n\n"
    assert t.user_turn("  Hi\n\n\nthere \n") == "User: Hi\nthere\n\nAssistant:"  # blank lines would end the turn
    assert t.stop_strings == ("\n\n",) and t.epilogue() == "\n\n"


def test_one_state_template() -> None:
    t = get_template("one-state")
    assert t.prefix("") == "<s>" and t.prefix("Be brief.") == "<s>System:Be brief.\n\n</s>"
    assert t.user_turn("Hi") == "User:Hi\n\n</s>Assistant:"
    assert t.epilogue() == "\n\n</s>" and "\n\n</s>" in t.stop_strings


def test_raw_template_is_untouched() -> None:
    t = get_template("raw")
    assert t.prefix("sys\n\n") == "sys\n\n" and t.user_turn(" a\n\n\nb") == " a\n\n\nb"
    assert t.stop_strings == () and t.epilogue() == ""


def test_unknown_template() -> None:
    with pytest.raises(InvalidArgument):
        get_template("alpaca")
