"""Stand-ins for a processor and question records, enough for bench and calibrate on tiny models."""

from visipruner.testing import random_prompt


class FakeTokenizer:
    pad_token_id = 0

    def get_vocab(self):
        return {}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids[:1])


class FakeProcessor:
    """Enough of a LlavaProcessor for the bench: a fixed random prompt per question."""

    def __init__(self, model):
        self.model, self.tokenizer = model, FakeTokenizer()

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return messages[0]["content"][1]["text"]

    def __call__(self, images, text, return_tensors="pt", **kw):
        return random_prompt(self.model, seed=int(text[0]), images=1)


class FakeQuestion:
    def __init__(self, i):
        self.id, self.family, self.question, self.answer = str(i), "all", str(i), "7"

    def load_image(self):
        return None
