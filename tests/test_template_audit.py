"""verify's template audit on a Llama-3.1 date header: the served prompt carries the day it
is served, the training text the day (or the fallback date) it was rendered with."""

import datetime

from traineagle3.data import special_token_ids, tokenize_conversation
from traineagle3.verify import template_check

# Llama-3.1's header, as its template writes it: today's date where the renderer offers
# strftime_now (HF and vLLM do), else the fallback "26 Jul 2024"
DATE_HEADER = (
    "{{ bos_token }}{% if strftime_now is defined %}{% set date_string = strftime_now('%d %b %Y') %}"
    "{% else %}{% set date_string = '26 Jul 2024' %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: {{ date_string }}<|eot_id|>"
)
# the turns; the generation prompt ends in a special token, so that the answer's first word
# cannot merge with it (with this test's GPT-2-style tokenizer "\n\n" + "Paris" would split as
# "\n" "\nParis": a mismatch of its own, which the audit would rightly report)
SERVED = DATE_HEADER + (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}"
)
TRAINED = SERVED.replace("strftime_now is defined", "false")  # rendered where no clock was offered


def prompt_ids(tokenizer, template: str, messages: list[dict]) -> list[int]:
    """The prompt part of training's rendering (everything before the first trained token)."""
    tokenizer.chat_template = template
    ids, mask = tokenize_conversation(
        tokenizer, messages + [{"role": "assistant", "content": "Paris."}], special_token_ids(tokenizer)
    )
    return ids[: mask.index(1)]


def test_a_date_header_of_another_day_fails_and_shows_both_dates(llama3_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    llama3_tokenizer.chat_template = SERVED
    text = llama3_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    served = llama3_tokenizer(text, add_special_tokens=False)["input_ids"]  # as a server tokenises a chat prompt
    today = datetime.date.today().strftime("%d %b %Y")
    assert today in llama3_tokenizer.decode(served)  # the server's prompt has today's date

    same = template_check(llama3_tokenizer, served, prompt_ids(llama3_tokenizer, SERVED, messages))
    assert same is None  # rendered the same day by the same template: the audit passes

    trained = prompt_ids(llama3_tokenizer, TRAINED, messages)
    message = template_check(llama3_tokenizer, served, trained)
    assert message is not None and "differs" in message
    served_side, trained_side = message.split("; trained ")
    assert "Today Date: " in served_side and today in served_side.split(" | ")[1]  # both texts, from the difference on
    assert "Today Date: " in trained_side and "26 Jul 2024" in trained_side.split(" | ")[1]
