"""Fact extraction: YAKE keyphrases plus regex facts, bounded card text, and loud YAKE failures."""

from __future__ import annotations

import importlib
import logging

import pytest

from qkv._facts import FACT_KINDS, Fact, Facts, extract_facts

# SQuAD v1.1 dev, CC BY-SA 4.0 (article "Super_Bowl_50").
SUPER_BOWL = (
    "Super Bowl 50 was an American football game to determine the champion of the National Football "
    "League (NFL) for the 2015 season. The American Football Conference (AFC) champion Denver "
    "Broncos defeated the National Football Conference (NFC) champion Carolina Panthers 24–10 to "
    "earn their third Super Bowl title. The game was played on February 7, 2016, at Levi's Stadium "
    "in the San Francisco Bay Area at Santa Clara, California. As this was the 50th Super Bowl, the "
    'league emphasized the "golden anniversary" with various gold-themed initiatives, as well as '
    "temporarily suspending the tradition of naming each Super Bowl game with Roman numerals (under "
    'which the game would have been known as "Super Bowl L"), so that the logo could prominently '
    "feature the Arabic numerals 50."
)

# SQuAD v1.1 dev, CC BY-SA 4.0 (article "Victoria_(Australia)").
VICTORIA = (
    "Victoria is the centre of dairy farming in Australia. It is home to 60% of Australia's 3 "
    "million dairy cattle and produces nearly two-thirds of the nation's milk, almost 6.4 billion "
    "litres. The state also has 2.4 million beef cattle, with more than 2.2 million cattle and "
    "calves slaughtered each year. In 2003–04, Victorian commercial fishing crews and aquaculture "
    "industry produced 11,634 tonnes of seafood valued at nearly A$109 million. Blacklipped abalone "
    "is the mainstay of the catch, bringing in A$46 million, followed by southern rock lobster "
    "worth A$13.7 million. Most abalone and rock lobster is exported to Asia."
)

# SQuAD v1.1 dev, CC BY-SA 4.0 (article "Steam_engine").
STEAM = (
    "The efficiency of a Rankine cycle is usually limited by the working fluid. Without the "
    "pressure reaching supercritical levels for the working fluid, the temperature range the cycle "
    "can operate over is quite small; in steam turbines, turbine entry temperatures are typically "
    "565 °C (the creep limit of stainless steel) and condenser temperatures are around 30 °C. This "
    "gives a theoretical Carnot efficiency of about 63% compared with an actual efficiency of 42% "
    "for a modern coal-fired power station. This low turbine entry temperature (compared with a gas "
    "turbine) is why the Rankine cycle is often used as a bottoming cycle in combined-cycle gas "
    "turbine power stations.[citation needed]"
)

# Written for this test: the kinds SQuAD prose rarely has.
RELEASE_NOTE = (
    "Install edgebus v0.4.2 from https://example.org/edgebus/releases (released 2025-03-14). The "
    "DynamicCache class in transformers 5.23.0 stores KV_CACHE tensors; call qkv.encode_card() or "
    "read `snapshot.positions`. On 12/03/2024 the gateway cost €1.5 million and cut latency by 35 "
    "percent to 120 ms over 3.5 GiB."
)


def test_super_bowl_has_keyphrases_dates_and_acronyms() -> None:
    facts = extract_facts(SUPER_BOWL)
    assert facts.keyphrase_error is None
    assert "Super Bowl" in facts.keyphrases
    assert "National Football League" in facts.keyphrases
    assert len(facts.keyphrases) <= 8
    assert "February 7, 2016" in facts.by_kind("date")
    assert "2015" in facts.by_kind("date")
    assert {"NFL", "AFC", "NFC"} <= set(facts.by_kind("identifier"))


def test_victoria_has_money_percentages_quantities_and_a_year_range() -> None:
    facts = extract_facts(VICTORIA)
    assert facts.keyphrase_error is None
    assert any("dairy" in phrase for phrase in facts.keyphrases)
    assert facts.by_kind("money") == ("A$109 million", "A$46 million", "A$13.7 million")
    assert facts.by_kind("percent") == ("60%",)
    assert "6.4 billion litres" in facts.by_kind("quantity")
    assert "11,634 tonnes" in facts.by_kind("quantity")
    assert "2003–04" in facts.by_kind("date")
    # Overlap priority: the money span is not reported again as a quantity.
    assert not any("109" in q for q in facts.by_kind("quantity"))


def test_steam_engine_has_temperatures_and_percentages() -> None:
    facts = extract_facts(STEAM)
    assert "Rankine cycle" in facts.keyphrases
    assert facts.by_kind("quantity") == ("565 °C", "30 °C")
    assert facts.by_kind("percent") == ("63%", "42%")


def test_release_note_has_versions_urls_and_code_identifiers() -> None:
    facts = extract_facts(RELEASE_NOTE)
    assert facts.by_kind("url") == ("https://example.org/edgebus/releases",)
    assert facts.by_kind("version") == ("v0.4.2", "5.23.0")
    assert facts.by_kind("date") == ("2025-03-14", "12/03/2024")
    assert facts.by_kind("money") == ("€1.5 million",)
    assert facts.by_kind("percent") == ("35 percent",)
    assert facts.by_kind("quantity") == ("120 ms", "3.5 GiB")
    assert {"DynamicCache", "KV_CACHE", "qkv.encode_card()", "`snapshot.positions`"} <= set(
        facts.by_kind("identifier")
    )


def test_card_text_holds_both_keyphrases_and_facts_within_the_bound() -> None:
    facts = extract_facts(VICTORIA)
    text = facts.to_text()
    assert len(text) <= 400
    assert text.startswith("keyphrases: ")
    assert "money: A$109 million" in text
    assert "percent: 60%" in text
    for limit in (0, 5, 30, 60, 120, 250, 1000):
        bounded = facts.to_text(limit)
        assert len(bounded) <= limit
    # A tight bound still shows more than one kind (round-robin), and never a cut item.
    tight = facts.to_text(80)
    assert tight.count("\n") >= 1
    for line in tight.splitlines():
        name, items = line.split(": ", 1)
        pool = facts.keyphrases if name == "keyphrases" else facts.by_kind(name)
        assert set(items.split("; ")) <= set(pool)


def test_output_is_deterministic_and_deduplicated() -> None:
    twice = STEAM + " " + STEAM
    first, second = extract_facts(twice), extract_facts(twice)
    assert first == second
    assert first.to_text() == second.to_text()
    assert first.by_kind("percent") == ("63%", "42%")
    assert len(set(first.keyphrases)) == len(first.keyphrases)
    # No keyphrase repeats the words of an earlier one (plural s ignored).
    words = [
        {w[:-1] if len(w) > 3 and w.endswith("s") else w for w in p.lower().split()} for p in first.keyphrases
    ]
    for i, later in enumerate(words):
        assert not any(later <= earlier for earlier in words[:i])


def test_to_text_orders_kinds_as_declared() -> None:
    facts = Facts(
        keyphrases=("alpha",),
        items=(Fact("identifier", "NFL"), Fact("url", "https://a.example"), Fact("date", "2016")),
    )
    assert facts.to_text() == "keyphrases: alpha\nurl: https://a.example\ndate: 2016\nidentifier: NFL"
    assert FACT_KINDS[0] == "url"


def test_a_swallowed_yake_exception_is_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    yake_core = importlib.import_module("yake.core.yake")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("tokenizer exploded")

    # YAKE 0.7 catches this itself, logs a warning and returns [] as if the text had no keyphrases.
    monkeypatch.setattr(yake_core, "DataCore", broken)
    with caplog.at_level(logging.WARNING, logger="qkv._facts"):
        facts = extract_facts(SUPER_BOWL)
    assert facts.keyphrases == ()
    assert facts.keyphrase_error is not None
    assert "tokenizer exploded" in facts.keyphrase_error
    assert any(r.name == "qkv._facts" and "keyphrase extraction failed" in r.message for r in caplog.records)
    # Regex facts still arrive.
    assert "February 7, 2016" in facts.by_kind("date")


def test_an_empty_yake_answer_for_real_text_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    yake_core = importlib.import_module("yake.core.yake")
    monkeypatch.setattr(yake_core.KeywordExtractor, "extract_keywords", lambda self, text: [])
    facts = extract_facts(STEAM)
    assert facts.keyphrase_error == "YAKE returned no keyphrases for a text with content words"


def test_text_without_content_words_is_not_a_failure() -> None:
    facts = extract_facts("the of and 42 % ... 7")
    assert facts.keyphrase_error is None
    assert facts.keyphrases == ()
    assert extract_facts("").keyphrase_error is None
    assert extract_facts(SUPER_BOWL, max_keyphrases=0).keyphrases == ()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        extract_facts("x", max_keyphrases=-1)
    with pytest.raises(ValueError):
        extract_facts("x", max_chars=0)
    with pytest.raises(ValueError):
        extract_facts("x").to_text(-1)
