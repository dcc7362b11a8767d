"""The released synthesizer's format: prompts byte for byte, and parsing of imperfect output."""

from ipt.data import pairs as fmt
from ipt.data.pairs import Pair


def test_a_finished_example_matches_the_released_layout_exactly():
    pairs = [Pair("q1", "a1"), Pair("q2", "a2")]
    assert fmt.example("T", pairs) == \
        "<s> <CON> T </CON>\n\n<QUE> q1 <ANS> a1 </END>\n\n<QUE> q2 <ANS> a2 </END></s>"


def test_a_prompt_chains_finished_examples_before_the_text_to_read():
    p = fmt.prompt("new text", [("old text", [Pair("q", "a")])])
    assert p == "<s> <CON> old text </CON>\n\n<QUE> q <ANS> a </END></s>" \
                "<s> <CON> new text </CON>\n\n"


def test_parsing_inverts_rendering():
    pairs = [Pair("What is it?", "A thing."), Pair("Why?", "Because.")]
    parsed = fmt.parse(fmt.render_pairs(pairs) + "</s>")
    assert parsed.pairs == pairs and not parsed.drops


def test_a_truncated_last_pair_is_dropped_and_counted():
    parsed = fmt.parse("<QUE> q1 <ANS> a1 </END>\n\n<QUE> q2 <ANS> half an ans")
    assert parsed.pairs == [Pair("q1", "a1")]
    assert parsed.drops == {"truncated": 1}


def test_a_piece_without_an_answer_marker_is_dropped():
    parsed = fmt.parse("<QUE> lonely question </END>\n\n<QUE> q <ANS> a </END>")
    assert parsed.pairs == [Pair("q", "a")]
    assert parsed.drops == {"no_answer_marker": 1}


def test_empty_answers_and_missing_question_markers_are_dropped():
    parsed = fmt.parse("<QUE> q1 <ANS>   </END>\n\nq2 <ANS> a2 </END>\n\n<QUE> q3 <ANS> a3 </END>")
    assert parsed.pairs == [Pair("q3", "a3")]
    assert parsed.drops == {"empty_answer": 1, "no_question_marker": 1}


def test_duplicate_questions_are_dropped_case_insensitively():
    parsed = fmt.parse("<QUE> Who? <ANS> me </END><QUE> WHO? <ANS> you </END>")
    assert parsed.pairs == [Pair("Who?", "me")]
    assert parsed.drops == {"duplicate_question": 1}


def test_garbage_parses_to_nothing_without_raising():
    for junk in ("", "</END>", "<ANS><ANS></END>", "\x00\ufffd", "no markers at all",
                 "<QUE> <ANS> </END>"):
        parsed = fmt.parse(junk)
        assert parsed.pairs == []


def test_text_after_the_end_of_the_example_is_ignored():
    parsed = fmt.parse("<QUE> q <ANS> a </END></s><s> <CON> hallucinated </CON>")
    assert parsed.pairs == [Pair("q", "a")] and not parsed.drops


def test_multiple_choice_questions_are_recognised_with_their_options():
    q = "Which colour is the sky?\nOptions:\n- blue\n- green\n- red"
    assert fmt.options_of(q) == ("Which colour is the sky?", ["blue", "green", "red"])
    assert Pair(q, "blue").kind == "mc"


def test_chain_of_thought_answers_split_into_rationale_and_final_answer():
    q = "Is 4 even? Let's think step by step."
    a = "4 is divisible by 2.\nTherefore, the answer is yes."
    assert Pair(q, a).kind == "cot"
    assert fmt.split_cot(a) == ("4 is divisible by 2.", "yes")
    mc_cot = "Pick one.\nOptions:\n- yes\n- no\nLet's think step by step."
    assert Pair(mc_cot, a).kind == "mc_cot"


def test_a_plain_question_mentioning_options_is_not_multiple_choice():
    assert fmt.options_of("What are the Options: here and there?") is None
    assert Pair("What is x?", "y").kind == "plain"
