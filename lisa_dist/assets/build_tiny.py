"""Regenerate the bundled tiny Llama, its tokenizer and the synthetic instruction data.

Run `python -m lisa_dist.assets.build_tiny`; two runs give byte-identical files.
"""

import os

# The BPE trainer counts pairs on a thread pool and breaks frequency ties by arrival order,
# so one thread is what makes the vocabulary reproducible. Must be set before tokenizers starts.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import json  # noqa: E402
import random  # noqa: E402
import string  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import jinja2  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from lisa_dist.assets import TINY_ALPACA, TINY_CHAT, TINY_MODEL_DIR  # noqa: E402
from lisa_dist.data import format_alpaca_prompt, load_examples  # noqa: E402

NUM_ALPACA = 1200
NUM_CHAT = 300
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# Role markers on their own line: the content then starts a fresh pre-token, so tokenizing a
# conversation turn by turn gives the same ids as tokenizing it whole.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System:\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User:\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant:\\n' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:\\n' }}{% endif %}"
)

WORDS = (
    "cat", "dog", "sun", "tree", "book", "fish", "bird", "moon", "star", "lamp", "cup", "hat", "pen",
    "rain", "snow", "wind", "milk", "rice", "door", "road", "ship", "frog", "bear", "lion", "wolf",
    "rose", "leaf", "rock", "sand", "gold", "blue", "red", "green", "apple", "bread", "house", "river",
    "cloud", "stone", "light",
)
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
    "Peru": "Lima", "Kenya": "Nairobi", "Cuba": "Havana", "Greece": "Athens", "Norway": "Oslo",
    "Poland": "Warsaw", "Russia": "Moscow", "China": "Beijing", "Canada": "Ottawa", "Chile": "Santiago",
    "Germany": "Berlin", "Austria": "Vienna", "Ireland": "Dublin", "Portugal": "Lisbon", "Sweden": "Stockholm",
}
SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly.", "Reply with the answer only.")

Task = tuple[str, str, str]


def reverse_word(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        return "Reverse the word.", word, word[::-1]
    return f"Reverse the word {word}.", "", word[::-1]


def uppercase_word(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        return "Write the word in uppercase.", word, word.upper()
    return f"Write {word} in uppercase.", "", word.upper()


def add_numbers(rng: random.Random) -> Task:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return f"What is {a} + {b}?", "", str(a + b)


def sort_letters(rng: random.Random) -> Task:
    letters = rng.sample(string.ascii_lowercase, 3)
    return "Sort the letters.", " ".join(letters), " ".join(sorted(letters))


def repeat_word(rng: random.Random) -> Task:
    word, times = rng.choice(WORDS), rng.randint(2, 4)
    return f"Repeat the word {times} times.", word, " ".join([word] * times)


def capital_of(rng: random.Random) -> Task:
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", "", CAPITALS[country]


def next_letter(rng: random.Random) -> Task:
    index = rng.randrange(25)
    return f"Which letter comes after {string.ascii_lowercase[index]}?", "", string.ascii_lowercase[index + 1]


def word_length(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    return "How many letters are in the word?", word, str(len(word))


TASKS: tuple[Callable[[random.Random], Task], ...] = (
    reverse_word, uppercase_word, add_numbers, sort_letters, repeat_word, capital_of, next_letter, word_length,
)


def random_task(rng: random.Random) -> Task:
    return rng.choice(TASKS)(rng)


def alpaca_records(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        instruction, input_text, output = random_task(rng)
        records.append({"instruction": instruction, "input": input_text, "output": output})
    return records


def chat_turn(rng: random.Random) -> list[dict[str, str]]:
    instruction, input_text, output = random_task(rng)
    question = f"{instruction}\n{input_text}" if input_text else instruction
    return [{"role": "user", "content": question}, {"role": "assistant", "content": output}]


def chat_records(count: int, seed: int) -> list[dict[str, list[dict[str, str]]]]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        messages = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        messages += chat_turn(rng)
        if rng.random() < 0.35:
            messages += chat_turn(rng)
        records.append({"messages": messages})
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def tokenizer_corpus(alpaca: list[dict[str, str]], chat: list[dict]) -> Iterator[str]:
    """The texts as the model sees them, so role markers and the prompt template get merges too."""
    for record in alpaca:
        yield format_alpaca_prompt(record["instruction"], record["input"]) + record["output"]
    template = jinja2.Template(CHAT_TEMPLATE)
    for record in chat:
        yield template.render(messages=record["messages"], bos_token="", eos_token="\n")


def train_tokenizer(corpus: Iterator[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: Path) -> PreTrainedTokenizerFast:
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=512, clean_up_tokenization_spaces=False)
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    hf_tokenizer.save_pretrained(directory)
    return hf_tokenizer


def save_model(hf_tokenizer: PreTrainedTokenizerFast, directory: Path) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64, intermediate_size=176, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(hf_tokenizer), max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=hf_tokenizer.bos_token_id,
        eos_token_id=hf_tokenizer.eos_token_id, pad_token_id=hf_tokenizer.pad_token_id, dtype="float32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def main() -> None:
    alpaca = alpaca_records(NUM_ALPACA, seed=0)
    chat = chat_records(NUM_CHAT, seed=1)
    write_jsonl(TINY_ALPACA, alpaca)
    write_jsonl(TINY_CHAT, chat)
    TINY_MODEL_DIR.mkdir(parents=True, exist_ok=True)
    hf_tokenizer = save_tokenizer(train_tokenizer(tokenizer_corpus(alpaca, chat)), TINY_MODEL_DIR)
    model = save_model(hf_tokenizer, TINY_MODEL_DIR)
    for path in (TINY_ALPACA, TINY_CHAT):
        lengths = sorted(len(example.input_ids) for example in load_examples(path, hf_tokenizer))
        print(f"{path.name}: {len(lengths)} examples, tokens median {lengths[len(lengths) // 2]}, "
              f"max {lengths[-1]}")
    num_params = sum(parameter.numel() for parameter in model.parameters())
    print(f"{TINY_MODEL_DIR.name}: vocab {len(hf_tokenizer)}, {num_params} parameters")


if __name__ == "__main__":
    main()
