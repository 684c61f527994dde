"""The bundled synthetic corpus: a small fictional world in Chinese and English.

`tiaoyu synth OUT/ --seed 0` writes, for every record kind of DESIGN §1, a train and a held-out
val file (`OUT/<kind>.train.jsonl`, `OUT/<kind>.val.jsonl`), plus `OUT/world.json` (the fact
table, for people who want to look) and `OUT/manifest.json` (counts, seed, description).
The same seed gives byte-identical files: every random choice comes from `random.Random`
streams seeded with strings like "0:text" (string seeds are hashed with SHA-512, so they do not
depend on PYTHONHASHSEED), and nothing iterates over a set.

Why it looks the way it does — the corpus has to teach a 1–5M-parameter model something in a
few CPU minutes, and every later stage needs a held-out number that moves:

* **The world.** 200 entities — 110 people, 20 cities, 40 pets, 30 named objects — each with an
  English and a Chinese name and 3–5 attributes drawn from small vocabularies (colour, food,
  job, age, home city, owner, ...). That makes about 860 entity facts, e.g. "Kamiro lives in
  Lunford." / "王丽住在青石城。".
* **Arithmetic facts.** a+b and a−b for 0 ≤ a, b ≤ 20, the 9×9 multiplication table, and 300
  two-digit sums below 100: about 1,050 facts, e.g. "3 plus 4 equals 7." / "3加4等于7。".
* **text** (pretraining, `--text-mb`, 4 MB by default): short documents of a few sentences —
  entity biographies in several phrasings and random sentence order (varied phrasings make
  facts *extractable* later, not just memorised in one wording), facts about several entities
  at once, arithmetic statements and tables, short stories consistent with the facts, solved
  word problems ("... 3 + 4 = 7. 7 - 2 = 5. So Kamiro has 5 apples.") and a few reviews.
  Entities and arithmetic facts are visited in shuffled rounds, so at the default size every
  fact is stated dozens of times. There are no question/answer pairs in the text.
* **Held-out facts.** 20% of the entity facts and 20% of the arithmetic facts are *val facts*:
  they appear in the pretraining text like all others, but no train record of chat or
  preference asks about them. Chat val therefore asks questions whose answer the model can only
  know from pretraining, in the Q→A format it can only know from SFT: exact-match accuracy on
  `chat.val` rises from ~0 only when both stages worked.
* **chat**: single questions with short exact answers ("What is 23 + 45?" → "68",
  "王丽最喜欢什么颜色？" → "红色"), half entity facts and half arithmetic, some with a system
  prompt, some multi-turn (2–3 questions), a few greetings. Val records are single-turn, one
  question about a val fact, so the target is the last assistant message.
* **preference**: prompt + chosen (the correct bare answer) + rejected (a wrong value of the same
  attribute, a wrong number, or an unhelpful "I don't know." / "我不知道。"); chosen ≠
  rejected always. Val pairs ask about val facts (pairwise accuracy of a reward model, DPO
  margins).
* **verifiable**: multi-step problems with small numbers and a bare-number answer — word
  problems ("Kamiro has 3 apples. Kamiro buys 4 more and eats 2. How many apples does Kamiro
  have now?" → "5"; "王丽有3个苹果，又买了4个，吃了2个。王丽现在有多少个苹果？" → "5"),
  "together" problems and expressions ("What is 3 + 4 - 2?"). Easy enough that a tiny model
  gets some right after SFT, so GRPO has a reward signal to raise.
* **reasoning**: the same kind of problems as chat records whose assistant message carries the
  steps in a separate `"reasoning"` field ("3 + 4 = 7. 7 - 2 = 5.") and the bare answer in
  `content`. `reasoning.val` holds exactly the problems of `verifiable.val`, and no train
  problem of either kind (nor any solved problem in the text) is a val problem.
* **classification**: sentiment reviews built from word lists (positive/negative adjectives,
  closings, neutral filler), English and Chinese, labels "positive"/"negative" exactly
  balanced; learnable from the words alone.

Sizes: `--records` train records per chat-like kind (default 4,000), `--val-records` (default a
tenth of that). Everything is generated in memory (a few MB) in a couple of seconds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import orjson

from tiaoyu_cli.data.synth_tools import tool_records
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.io import atomic_open, atomic_write_bytes

KINDS = ("text", "chat", "preference", "verifiable", "reasoning", "classification")
FORMAT_VERSION = 1


@dataclass
class SynthConfig:
    seed: int = 0
    text_mb: float = 4.0  # size of text.train.jsonl (text field bytes, UTF-8), in MB (1e6 bytes)
    records: int = 4000  # train records per chat-like kind
    val_records: int | None = None  # per kind; default records // 10
    lang: str = "both"  # both | en | zh
    val_fact_frac: float = 0.2  # share of facts held out for val questions

    def n_val(self) -> int:
        return self.val_records if self.val_records is not None else max(1, self.records // 10)

    def langs(self) -> tuple[str, ...]:
        if self.lang == "both":
            return ("en", "zh")
        if self.lang in ("en", "zh"):
            return (self.lang,)
        raise TiaoyuError(f"--lang must be both, en or zh, not {self.lang!r}")


# ---------------------------------------------------------------------------------------------
# Vocabularies: (english, chinese) pairs.

COLOURS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("white", "白色"),
           ("black", "黑色"), ("purple", "紫色"), ("orange", "橙色"), ("pink", "粉色"), ("grey", "灰色")]
FOODS = [("noodles", "面条"), ("rice", "米饭"), ("dumplings", "饺子"), ("apples", "苹果"), ("bread", "面包"),
         ("fish", "鱼"), ("soup", "汤"), ("cake", "蛋糕"), ("tofu", "豆腐"), ("pears", "梨"),
         ("honey", "蜂蜜"), ("cheese", "奶酪")]
JOBS = [("teacher", "老师"), ("doctor", "医生"), ("farmer", "农民"), ("baker", "面包师"), ("painter", "画家"),
        ("singer", "歌手"), ("driver", "司机"), ("cook", "厨师"), ("fisher", "渔夫"), ("writer", "作家")]
REGIONS = [("north", "北方"), ("south", "南方"), ("east", "东方"), ("west", "西方"), ("centre", "中部")]
# species: (en, zh, zh measure word)
SPECIES = [("cat", "猫", "只"), ("dog", "狗", "只"), ("rabbit", "兔子", "只"), ("horse", "马", "匹"),
           ("duck", "鸭子", "只"), ("goat", "山羊", "只"), ("parrot", "鹦鹉", "只"), ("turtle", "乌龟", "只")]

EN_SYLLABLES = ["ka", "mi", "ro", "lu", "na", "te", "si", "vo", "ba", "de", "fi", "go", "ha", "jo", "ke",
                "la", "me", "ni", "pa", "ri", "sa", "to", "vi", "wa", "ze", "bo", "da", "ra", "li", "mo"]
ZH_SURNAMES = list("王李张刘陈杨赵黄周吴徐孙马朱胡郭何林高罗")
ZH_GIVEN = list("明丽华强芳军静磊洋艳勇杰娟涛敏超霞平刚英梅兰云飞雪松亮晨")
ZH_PET = list("豆球花毛点乐米糖圆团福旺咪贝妞果")
CITY_EN_SUFFIX = ["ford", "ton", "vale", "burg", "port", "field", "wick", "more"]
ZH_CITY_CHARS = list("青石云枫松海月金白春水山桃柳风")
OBJ_ADJ = [("Silver", "银"), ("Golden", "金"), ("Old", "旧"), ("Tiny", "小"), ("Jade", "玉"), ("Iron", "铁"),
           ("Glass", "玻璃"), ("Moon", "月亮"), ("Star", "星星"), ("Stone", "石")]
OBJ_NOUN = [("Bell", "铃"), ("Lamp", "灯"), ("Clock", "钟"), ("Key", "钥匙"), ("Drum", "鼓"), ("Mirror", "镜子"),
            ("Box", "盒子"), ("Flute", "笛子"), ("Cup", "杯子"), ("Kite", "风筝")]

N_PEOPLE, N_CITIES, N_ANIMALS, N_OBJECTS = 110, 20, 40, 30


@dataclass
class Entity:
    kind: str  # person | city | animal | object
    en: str
    zh: str
    attrs: dict[str, tuple[str, str]] = field(default_factory=dict)  # attribute -> (en value, zh value)
    measure: str = "只"  # zh measure word (animals)

    def name(self, lang: str) -> str:
        return self.en if lang == "en" else self.zh


@dataclass(frozen=True)
class Fact:
    """One queryable fact: an entity attribute, or an arithmetic result (entity=None)."""

    entity: int | None  # index into World.entities
    attr: str  # attribute name, or "+", "-", "×"
    a: int = 0
    b: int = 0

    def key(self) -> str:
        return f"{self.entity}:{self.attr}" if self.entity is not None else f"{self.a}{self.attr}{self.b}"


@dataclass
class World:
    entities: list[Entity]
    entity_facts: list[Fact]
    arith_facts: list[Fact]
    val_keys: set[str]  # keys of held-out facts (membership tests only; never iterated)

    def value(self, f: Fact, lang: str) -> str:
        if f.entity is None:
            return str(arith(f.attr, f.a, f.b))
        en, zh = self.entities[f.entity].attrs[f.attr]
        return en if lang == "en" else zh

    def is_val(self, f: Fact) -> bool:
        return f.key() in self.val_keys

    def of_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities if e.kind == kind]


def arith(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _unique_names(rng: random.Random, n: int, make: Callable[[], str], taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        s = make()
        if s not in taken:
            taken.add(s)
            out.append(s)
    return out


def build_world(seed: int, val_frac: float = 0.2) -> World:
    rng = random.Random(f"{seed}:world")
    taken: set[str] = set()

    def en_name(k: int) -> Callable[[], str]:
        return lambda: cap("".join(rng.choice(EN_SYLLABLES) for _ in range(k)))

    def en_person() -> str:
        return en_name(rng.choice((2, 3)))()

    def zh_person() -> str:
        return rng.choice(ZH_SURNAMES) + "".join(rng.choice(ZH_GIVEN) for _ in range(rng.choice((1, 2))))

    def en_city() -> str:
        return cap(rng.choice(EN_SYLLABLES) + rng.choice(EN_SYLLABLES)[0] + rng.choice(CITY_EN_SUFFIX))

    def zh_city() -> str:
        return "".join(rng.sample(ZH_CITY_CHARS, 2)) + "城"

    def en_pet() -> str:
        s = rng.choice(EN_SYLLABLES)
        return cap(s + s) if rng.random() < 0.4 else cap(s + rng.choice(EN_SYLLABLES)) + "y"

    def zh_pet() -> str:
        c = rng.choice(ZH_PET)
        return c + c if rng.random() < 0.4 else rng.choice(("小", "阿", "大")) + c  # 64 possible names

    cities = [Entity("city", en, zh) for en, zh in zip(_unique_names(rng, N_CITIES, en_city, taken),
                                                        _unique_names(rng, N_CITIES, zh_city, taken))]
    people = [Entity("person", en, zh) for en, zh in zip(_unique_names(rng, N_PEOPLE, en_person, taken),
                                                          _unique_names(rng, N_PEOPLE, zh_person, taken))]
    animals = [Entity("animal", en, zh) for en, zh in zip(_unique_names(rng, N_ANIMALS, en_pet, taken),
                                                           _unique_names(rng, N_ANIMALS, zh_pet, taken))]
    combos = [(a, n) for a in OBJ_ADJ for n in OBJ_NOUN]
    objects = [Entity("object", f"the {a[0]} {n[0]}", a[1] + n[1]) for a, n in rng.sample(combos, N_OBJECTS)]

    for c in cities:
        c.attrs["region"] = rng.choice(REGIONS)
        c.attrs["food"] = rng.choice(FOODS)
        c.attrs["colour"] = rng.choice(COLOURS)
    for p in people:
        home = rng.choice(cities)
        p.attrs["city"] = (home.en, home.zh)
        p.attrs["colour"] = rng.choice(COLOURS)
        p.attrs["food"] = rng.choice(FOODS)
        p.attrs["age"] = (str(rng.randint(6, 80)),) * 2
        p.attrs["job"] = rng.choice(JOBS)
    for a in animals:
        sp = rng.choice(SPECIES)
        a.attrs["species"] = (sp[0], sp[1])
        a.measure = sp[2]
        a.attrs["colour"] = rng.choice(COLOURS)
        owner = rng.choice(people)
        a.attrs["owner"] = (owner.en, owner.zh)
        a.attrs["age"] = (str(rng.randint(1, 15)),) * 2
    for o in objects:
        place = rng.choice(cities)
        o.attrs["place"] = (place.en, place.zh)
        owner = rng.choice(people)
        o.attrs["owner"] = (owner.en, owner.zh)
        o.attrs["age"] = (str(rng.randint(10, 300)),) * 2

    entities = cities + people + animals + objects
    entity_facts = [Fact(i, attr) for i, e in enumerate(entities) for attr in e.attrs]
    arith_facts = [Fact(None, "+", a, b) for a in range(21) for b in range(21)]
    arith_facts += [Fact(None, "-", a, b) for a in range(21) for b in range(a + 1)]
    arith_facts += [Fact(None, "×", a, b) for a in range(1, 10) for b in range(1, 10)]
    two_digit: dict[tuple[int, int], None] = {}
    while len(two_digit) < 300:
        a = rng.randint(10, 89)
        two_digit[(a, rng.randint(10, 99 - a))] = None
    arith_facts += [Fact(None, "+", a, b) for a, b in two_digit]

    val_keys: set[str] = set()
    for facts in (entity_facts, arith_facts):
        order = list(range(len(facts)))
        rng.shuffle(order)
        for i in order[: int(round(len(facts) * val_frac))]:
            val_keys.add(facts[i].key())
    return World(entities, entity_facts, arith_facts, val_keys)


# ---------------------------------------------------------------------------------------------
# Templates. {n} = entity name, {v} = value, {o} = owner/other name.

STATEMENTS: dict[tuple[str, str, str], list[str]] = {
    # (entity kind, attribute, lang)
    ("person", "city", "en"): ["{n} lives in {v}.", "{n} is from {v}.", "The home of {n} is in {v}.", "{n}'s home city is {v}."],
    ("person", "city", "zh"): ["{n}住在{v}。", "{n}的家在{v}。", "{n}来自{v}。"],
    ("person", "colour", "en"): ["{n}'s favourite colour is {v}.", "{n} likes the colour {v} best.", "The favourite colour of {n} is {v}."],
    ("person", "colour", "zh"): ["{n}最喜欢的颜色是{v}。", "{n}最喜欢{v}。"],
    ("person", "food", "en"): ["{n}'s favourite food is {v}.", "{n} loves to eat {v}.", "The favourite food of {n} is {v}."],
    ("person", "food", "zh"): ["{n}最喜欢吃{v}。", "{n}最爱的食物是{v}。"],
    ("person", "age", "en"): ["{n} is {v} years old.", "The age of {n} is {v}."],
    ("person", "age", "zh"): ["{n}今年{v}岁。", "{n}已经{v}岁了。"],
    ("person", "job", "en"): ["{n} is a {v}.", "{n} works as a {v}.", "The job of {n} is {v}."],
    ("person", "job", "zh"): ["{n}是一名{v}。", "{n}的工作是{v}。"],
    ("city", "region", "en"): ["{n} is in the {v}.", "{n} lies in the {v} of the land."],
    ("city", "region", "zh"): ["{n}位于{v}。", "{n}在{v}。"],
    ("city", "food", "en"): ["{n} is famous for its {v}.", "People in {n} are proud of their {v}."],
    ("city", "food", "zh"): ["{n}以{v}闻名。", "{n}最有名的是{v}。"],
    ("city", "colour", "en"): ["The roofs in {n} are {v}.", "In {n}, the roofs are painted {v}."],
    ("city", "colour", "zh"): ["{n}的屋顶是{v}的。", "{n}的屋顶都涂成了{v}。"],
    ("animal", "species", "en"): ["{n} is a {v}.", "{n} is a little {v}."],
    ("animal", "species", "zh"): ["{n}是一{m}{v}。"],
    ("animal", "colour", "en"): ["{n} is {v}.", "The colour of {n} is {v}."],
    ("animal", "colour", "zh"): ["{n}是{v}的。", "{n}的颜色是{v}。"],
    ("animal", "owner", "en"): ["{n} belongs to {v}.", "{v} owns {n}.", "{v} has a pet named {n}."],
    ("animal", "owner", "zh"): ["{n}的主人是{v}。", "{v}养了{n}。"],
    ("animal", "age", "en"): ["{n} is {v} years old.", "The age of {n} is {v}."],
    ("animal", "age", "zh"): ["{n}今年{v}岁。", "{n}已经{v}岁了。"],
    ("object", "place", "en"): ["{n} is kept in {v}.", "You can find {n} in {v}."],
    ("object", "place", "zh"): ["{n}放在{v}。", "{n}保存在{v}。"],
    ("object", "owner", "en"): ["{n} belongs to {v}.", "{v} owns {n}."],
    ("object", "owner", "zh"): ["{n}的主人是{v}。", "{n}属于{v}。"],
    ("object", "age", "en"): ["{n} is {v} years old.", "The age of {n} is {v} years."],
    ("object", "age", "zh"): ["{n}已经有{v}年了。", "{n}有{v}年的历史。"],
}

QUESTIONS: dict[tuple[str, str, str], list[str]] = {
    ("person", "city", "en"): ["Where does {n} live?", "What is {n}'s home city?", "Which city is {n} from?"],
    ("person", "city", "zh"): ["{n}住在哪里？", "{n}的家在哪座城市？", "{n}来自哪里？"],
    ("person", "colour", "en"): ["What is {n}'s favourite colour?", "Which colour does {n} like best?"],
    ("person", "colour", "zh"): ["{n}最喜欢什么颜色？", "{n}最喜欢的颜色是什么？"],
    ("person", "food", "en"): ["What is {n}'s favourite food?", "What does {n} love to eat?"],
    ("person", "food", "zh"): ["{n}最喜欢吃什么？", "{n}最爱的食物是什么？"],
    ("person", "age", "en"): ["How old is {n}?", "What is the age of {n}?"],
    ("person", "age", "zh"): ["{n}今年几岁？", "{n}多大了？"],
    ("person", "job", "en"): ["What is {n}'s job?", "What does {n} do for work?"],
    ("person", "job", "zh"): ["{n}的工作是什么？", "{n}是做什么的？"],
    ("city", "region", "en"): ["Which part of the land is {n} in?", "Where is {n}?"],
    ("city", "region", "zh"): ["{n}位于哪里？", "{n}在哪个方位？"],
    ("city", "food", "en"): ["What is {n} famous for?", "Which food is {n} famous for?"],
    ("city", "food", "zh"): ["{n}以什么闻名？", "{n}最有名的食物是什么？"],
    ("city", "colour", "en"): ["What colour are the roofs in {n}?"],
    ("city", "colour", "zh"): ["{n}的屋顶是什么颜色？"],
    ("animal", "species", "en"): ["What kind of animal is {n}?", "What animal is {n}?"],
    ("animal", "species", "zh"): ["{n}是什么动物？"],
    ("animal", "colour", "en"): ["What colour is {n}?"],
    ("animal", "colour", "zh"): ["{n}是什么颜色的？"],
    ("animal", "owner", "en"): ["Who owns {n}?", "Whose pet is {n}?"],
    ("animal", "owner", "zh"): ["{n}的主人是谁？", "谁养了{n}？"],
    ("animal", "age", "en"): ["How old is {n}?"],
    ("animal", "age", "zh"): ["{n}今年几岁？", "{n}多大了？"],
    ("object", "place", "en"): ["Where is {n} kept?", "In which city can you find {n}?"],
    ("object", "place", "zh"): ["{n}放在哪里？", "{n}保存在哪座城市？"],
    ("object", "owner", "en"): ["Who owns {n}?", "Whom does {n} belong to?"],
    ("object", "owner", "zh"): ["{n}的主人是谁？", "{n}属于谁？"],
    ("object", "age", "en"): ["How old is {n}?", "How many years old is {n}?"],
    ("object", "age", "zh"): ["{n}有多少年了？", "{n}有几年的历史？"],
}

ARITH_STATEMENTS = {
    ("+", "en"): ["{a} plus {b} equals {c}.", "{a} + {b} = {c}.", "The sum of {a} and {b} is {c}.", "Adding {b} to {a} gives {c}."],
    ("+", "zh"): ["{a}加{b}等于{c}。", "{a} + {b} = {c}。", "{a}和{b}的和是{c}。"],
    ("-", "en"): ["{a} minus {b} equals {c}.", "{a} - {b} = {c}.", "Taking {b} from {a} leaves {c}."],
    ("-", "zh"): ["{a}减{b}等于{c}。", "{a} - {b} = {c}。", "{a}减去{b}得{c}。"],
    ("×", "en"): ["{a} times {b} equals {c}.", "{a} × {b} = {c}.", "The product of {a} and {b} is {c}."],
    ("×", "zh"): ["{a}乘以{b}等于{c}。", "{a} × {b} = {c}。", "{a}乘{b}得{c}。"],
}
ARITH_QUESTIONS = {
    ("+", "en"): ["What is {a} + {b}?", "What is {a} plus {b}?", "How much is {a} + {b}?", "Calculate {a} + {b}."],
    ("+", "zh"): ["{a}加{b}等于多少？", "{a} + {b}等于几？", "计算{a}加{b}。"],
    ("-", "en"): ["What is {a} - {b}?", "What is {a} minus {b}?", "Calculate {a} - {b}."],
    ("-", "zh"): ["{a}减{b}等于多少？", "{a} - {b}等于几？", "计算{a}减{b}。"],
    ("×", "en"): ["What is {a} × {b}?", "What is {a} times {b}?"],
    ("×", "zh"): ["{a}乘以{b}等于多少？", "{a} × {b}等于几？"],
}

SYSTEM_PROMPTS = {
    "en": ["You are a helpful assistant.", "You are Tiaoyu, a small helpful assistant.", "Answer briefly."],
    "zh": ["你是一个乐于助人的助手。", "你是Tiaoyu，一个小助手。", "请简短回答。"],
}
SMALL_TALK = {
    "en": [("Hello!", "Hello! How can I help you?"), ("Hi", "Hi! What would you like to know?"),
           ("Who are you?", "I am Tiaoyu, a small language model."), ("Thank you!", "You are welcome!"),
           ("What can you do?", "I can answer questions about people, places and numbers."),
           ("Goodbye!", "Goodbye! Have a nice day.")],
    "zh": [("你好！", "你好！有什么可以帮你？"), ("嗨", "嗨！你想知道什么？"), ("你是谁？", "我是Tiaoyu，一个小语言模型。"),
           ("谢谢！", "不客气！"), ("你会做什么？", "我可以回答关于人物、地方和数字的问题。"), ("再见！", "再见！祝你愉快。")],
}
UNHELPFUL = {
    "en": ["I don't know.", "That is a hard question.", "I am not sure.", "Ask someone else."],
    "zh": ["我不知道。", "这个问题太难了。", "我不确定。", "你去问别人吧。"],
}

# Word problems: item (en singular, en plural, zh, zh measure word, edible)
ITEMS = [("apple", "apples", "苹果", "个", True), ("book", "books", "书", "本", False),
         ("pencil", "pencils", "铅笔", "支", False), ("candy", "candies", "糖", "颗", True),
         ("ball", "balls", "球", "个", False), ("flower", "flowers", "花", "朵", False),
         ("stamp", "stamps", "邮票", "张", False), ("egg", "eggs", "鸡蛋", "个", True),
         ("cookie", "cookies", "饼干", "块", True), ("shell", "shells", "贝壳", "个", False)]
GAIN_EVENTS = {"en": ["buys {k} more", "gets {k} from {f}", "finds {k} more"],
               "zh": ["又买了{k}{m}", "从{f}那里得到了{k}{m}", "又找到了{k}{m}"]}
LOSS_EVENTS = {"en": ["gives {k} to {f}", "loses {k}"], "zh": ["送给{f}{k}{m}", "弄丢了{k}{m}"]}
EAT_EVENT = {"en": "eats {k}", "zh": "吃了{k}{m}"}

# Reviews
POS_EN = ["great", "wonderful", "excellent", "lovely", "amazing", "perfect", "pleasant", "nice", "fantastic", "good"]
NEG_EN = ["terrible", "awful", "bad", "horrible", "disappointing", "poor", "dreadful", "unpleasant", "nasty", "useless"]
POS_ZH = ["好", "棒", "出色", "完美", "优秀", "舒服", "精彩", "贴心"]
NEG_ZH = ["差", "糟糕", "差劲", "恶心", "难受", "烂", "失败", "垃圾"]
ADV_EN = ["very ", "really ", "quite ", "so ", ""]
DEG_ZH = ["很", "非常", "特别", "真"]
SUBJ_EN = ["the {food} in {city}", "the hotel in {city}", "this {thing}", "the service", "the {food} here",
           "the shop in {city}", "the trip to {city}"]
SUBJ_ZH = ["{city}的{food}", "{city}的酒店", "这个{thing}", "这家店的服务", "这里的{food}", "{city}的那家店", "去{city}的旅行"]
THINGS = [("lamp", "台灯"), ("clock", "钟"), ("book", "书"), ("phone", "手机"), ("chair", "椅子"), ("bag", "包"),
          ("toy", "玩具"), ("kettle", "水壶")]
CLOSE_POS = {"en": ["I will come back.", "I would recommend it.", "Five stars!", "I loved it."],
             "zh": ["下次还来。", "强烈推荐！", "五星好评！", "我很喜欢。"]}
CLOSE_NEG = {"en": ["I will never come back.", "I want my money back.", "One star.", "I hated it."],
             "zh": ["再也不来了。", "想退钱。", "一星差评。", "我很讨厌。"]}
DAYS = [("Monday", "星期一"), ("Tuesday", "星期二"), ("Wednesday", "星期三"), ("Thursday", "星期四"),
        ("Friday", "星期五"), ("Saturday", "星期六"), ("Sunday", "星期日")]


# ---------------------------------------------------------------------------------------------
# Rendering


class Cycler:
    """Yield items in shuffled rounds: every item once per round, so coverage is even."""

    def __init__(self, items: list, rng: random.Random):
        self.items, self.rng, self.pos, self.order = items, rng, 0, []

    def next(self):
        if self.pos >= len(self.order):
            self.order = list(self.items)
            self.rng.shuffle(self.order)
            self.pos = 0
        self.pos += 1
        return self.order[self.pos - 1]


def join_sentences(sents: list[str], lang: str) -> str:
    return (" " if lang == "en" else "").join(sents)


def fact_sentence(w: World, f: Fact, lang: str, rng: random.Random) -> str:
    if f.entity is None:
        t = rng.choice(ARITH_STATEMENTS[(f.attr, lang)])
        return cap(t.format(a=f.a, b=f.b, c=arith(f.attr, f.a, f.b)))
    e = w.entities[f.entity]
    t = rng.choice(STATEMENTS[(e.kind, f.attr, lang)])
    return cap(t.format(n=e.name(lang), v=w.value(f, lang), m=e.measure))


def fact_question(w: World, f: Fact, lang: str, rng: random.Random) -> str:
    if f.entity is None:
        return rng.choice(ARITH_QUESTIONS[(f.attr, lang)]).format(a=f.a, b=f.b)
    e = w.entities[f.entity]
    return cap(rng.choice(QUESTIONS[(e.kind, f.attr, lang)]).format(n=e.name(lang)))


def wrong_value(w: World, f: Fact, lang: str, rng: random.Random) -> str:
    """A plausible wrong answer: another value of the same attribute, or a nearby wrong number."""
    right = w.value(f, lang)
    if right.isdigit():
        n = int(right)
        while True:
            d = rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])
            if n + d >= 0:
                return str(n + d)
    e = w.entities[f.entity]  # type: ignore[index]
    pool = [o.attrs[f.attr] for o in w.entities if o.kind == e.kind and f.attr in o.attrs]
    while True:
        v = rng.choice(pool)
        cand = v[0] if lang == "en" else v[1]
        if cand != right:
            return cand


# ----- word problems -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    lang: str
    prompt: str
    steps: tuple[str, ...]  # e.g. ("3 + 4 = 7", "7 - 2 = 5")
    answer: str
    story: str = ""  # the problem told and solved as narrative text, for pretraining documents

    def reasoning(self) -> str:
        return steps_text(self.steps, self.lang)


def steps_text(steps: tuple[str, ...] | list[str], lang: str) -> str:
    """("3 + 4 = 7", "7 - 2 = 5") -> "3 + 4 = 7. 7 - 2 = 5." (en) or "3 + 4 = 7，7 - 2 = 5。" (zh)."""
    if lang == "en":
        return " ".join(s + "." for s in steps)
    return "，".join(steps) + "。"


def _solved(lang: str, *parts: str) -> str:
    return (" " if lang == "en" else "").join(parts)


def make_problem(w: World, lang: str, rng: random.Random) -> Problem:
    people = w.of_kind("person")
    r = rng.random()
    if r < 0.55:  # one person, a start count and 1-3 events
        p, friend = rng.sample(people, 2)
        n, fn = p.name(lang), friend.name(lang)
        item = rng.choice(ITEMS)
        start = rng.randint(2, 9)
        cur, steps, evs = start, [], []
        for _ in range(rng.choice((1, 2, 2, 3))):
            if cur > 0 and rng.random() < 0.5:
                k = rng.randint(1, min(cur, 9))
                t = EAT_EVENT[lang] if item[4] and rng.random() < 0.5 else rng.choice(LOSS_EVENTS[lang])
                steps.append(f"{cur} - {k} = {cur - k}")
                cur -= k
            else:
                k = rng.randint(1, 9)
                t = rng.choice(GAIN_EVENTS[lang])
                steps.append(f"{cur} + {k} = {cur + k}")
                cur += k
            evs.append(t.format(k=k, f=fn, m=item[3]))
        if lang == "en":
            events = evs[0] if len(evs) == 1 else ", ".join(evs[:-1]) + " and " + evs[-1]
            story = f"{n} has {start} {item[1]}. {n} {events}."
            prompt = f"{story} How many {item[1]} does {n} have now?"
            tail = f"So {n} has {cur} {item[1] if cur != 1 else item[0]}."
        else:
            story = f"{n}有{start}{item[3]}{item[2]}，" + "，".join(evs) + "。"
            prompt = f"{story}{n}现在有多少{item[3]}{item[2]}？"
            tail = f"所以{n}有{cur}{item[3]}{item[2]}。"
        return Problem(lang, prompt, tuple(steps), str(cur), _solved(lang, story, steps_text(steps, lang), tail))
    if r < 0.75:  # two people, how many together
        p, q = rng.sample(people, 2)
        item = rng.choice(ITEMS)
        x, y = rng.randint(2, 9), rng.randint(2, 9)
        if lang == "en":
            story = f"{p.en} has {x} {item[1]} and {q.en} has {y} {item[1]}."
            prompt = f"{story} How many {item[1]} do they have together?"
            tail = f"So they have {x + y} {item[1]} together."
        else:
            story = f"{p.zh}有{x}{item[3]}{item[2]}，{q.zh}有{y}{item[3]}{item[2]}。"
            prompt = f"{story}他们一共有多少{item[3]}{item[2]}？"
            tail = f"所以他们一共有{x + y}{item[3]}{item[2]}。"
        steps = [f"{x} + {y} = {x + y}"]
        return Problem(lang, prompt, tuple(steps), str(x + y), _solved(lang, story, steps_text(steps, lang), tail))
    # an expression with 2-3 operations, left to right (a leading × is done first anyway)
    if rng.random() < 0.25:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        cur, expr, steps = a * b, f"{a} × {b}", [f"{a} × {b} = {a * b}"]
        n_more = 1
    else:
        cur = rng.randint(1, 20)
        expr, steps, n_more = str(cur), [], rng.choice((2, 2, 3))
    for _ in range(n_more):
        if cur > 0 and rng.random() < 0.5:
            k = rng.randint(1, min(cur, 9))
            steps.append(f"{cur} - {k} = {cur - k}")
            expr += f" - {k}"
            cur -= k
        else:
            k = rng.randint(1, 9)
            steps.append(f"{cur} + {k} = {cur + k}")
            expr += f" + {k}"
            cur += k
    if lang == "en":
        prompt = rng.choice(["What is {e}?", "Calculate {e}.", "Compute {e}."]).format(e=expr)
        story = f"{expr} = {cur}."
    else:
        prompt = rng.choice(["{e}等于多少？", "计算：{e}"]).format(e=expr)
        story = f"{expr} = {cur}。"
    return Problem(lang, prompt, tuple(steps), str(cur), _solved(lang, steps_text(steps, lang), story))


# ----- reviews ------------------------------------------------------------------------------------


def make_review(w: World, lang: str, positive: bool, rng: random.Random) -> str:
    city = rng.choice(w.of_kind("city")).name(lang)
    food = rng.choice(FOODS)
    thing = rng.choice(THINGS)
    day = rng.choice(DAYS)
    if lang == "en":
        adjs = rng.sample(POS_EN if positive else NEG_EN, 2)
        subj = rng.choice(SUBJ_EN).format(food=food[0], city=city, thing=thing[0])
        verb = "were" if subj.split(" ")[1] in ("noodles", "dumplings", "apples", "pears") else "was"
        first = rng.choice([
            f"{cap(subj)} {verb} {rng.choice(ADV_EN)}{adjs[0]}.",
            f"I thought {subj} {verb} {rng.choice(ADV_EN)}{adjs[0]}.",
            f"{cap(subj)} {verb} {adjs[0]} and {adjs[1]}.",
        ])
        extra = [f"I went there on {day[0]}.", f"We were a group of {rng.randint(2, 6)}."]
        close = rng.choice(CLOSE_POS["en"] if positive else CLOSE_NEG["en"])
        sents = [first]
        if rng.random() < 0.5:
            sents.insert(rng.randint(0, 1), rng.choice(extra))
        if rng.random() < 0.7:
            sents.append(close)
        return " ".join(sents)
    adjs = rng.sample(POS_ZH if positive else NEG_ZH, 2)
    subj = rng.choice(SUBJ_ZH).format(food=food[1], city=city, thing=thing[1])
    first = rng.choice([
        f"{subj}{rng.choice(DEG_ZH)}{adjs[0]}。",
        f"我觉得{subj}{rng.choice(DEG_ZH)}{adjs[0]}。",
        f"{subj}{rng.choice(DEG_ZH)}{adjs[0]}，也{rng.choice(DEG_ZH)}{adjs[1]}。",
    ])
    extra = [f"我是{day[1]}去的。", f"我们一共{rng.randint(2, 6)}个人。"]
    close = rng.choice(CLOSE_POS["zh"] if positive else CLOSE_NEG["zh"])
    sents = [first]
    if rng.random() < 0.5:
        sents.insert(rng.randint(0, 1), rng.choice(extra))
    if rng.random() < 0.7:
        sents.append(close)
    return "".join(sents)


# ---------------------------------------------------------------------------------------------
# Kind generators


class Generator:
    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        self.w = build_world(cfg.seed, cfg.val_fact_frac)
        self.langs = cfg.langs()
        self.train_entity = [f for f in self.w.entity_facts if not self.w.is_val(f)]
        self.val_entity = [f for f in self.w.entity_facts if self.w.is_val(f)]
        self.train_arith = [f for f in self.w.arith_facts if not self.w.is_val(f)]
        self.val_arith = [f for f in self.w.arith_facts if self.w.is_val(f)]
        self._problems: tuple[list[Problem], set[str]] | None = None

    def rng(self, stream: str) -> random.Random:
        return random.Random(f"{self.cfg.seed}:{stream}")

    # ----- text ------------------------------------------------------------------------------

    def text_docs(self, split: str) -> Iterator[str]:
        """Documents until their UTF-8 size reaches --text-mb (train) or 5% of it (val)."""
        rng = self.rng(f"text.{split}")
        budget = self.cfg.text_mb * 1e6 * (1.0 if split == "train" else 0.05)
        if split == "val":
            budget = max(budget, 2000.0)
        w = self.w
        # one cycler per language and use, so every entity gets full biographies in both languages
        # evenly, and every arithmetic fact is stated in both languages evenly
        ents = {lang: Cycler(list(range(len(w.entities))), rng) for lang in self.langs}
        mixed = {lang: Cycler(list(range(len(w.entities))), rng) for lang in self.langs}
        ariths = {lang: Cycler(w.arith_facts, rng) for lang in self.langs}
        val_prompts = self.problems()[1]
        people = [i for i, e in enumerate(w.entities) if e.kind == "person"]
        kinds = ["bio", "bio", "bio", "mixed", "arith", "arith", "table", "story", "problem", "review"]
        size = 0
        while size < budget:
            lang = rng.choice(self.langs)
            kind = rng.choice(kinds)
            if kind == "bio":
                e = ents[lang].next()
                facts = [Fact(e, a) for a in w.entities[e].attrs]
                rng.shuffle(facts)
                doc = join_sentences([fact_sentence(w, f, lang, rng) for f in facts], lang)
            elif kind == "mixed":
                facts = [Fact(e, rng.choice(list(w.entities[e].attrs))) for e in (mixed[lang].next() for _ in range(rng.randint(3, 6)))]
                doc = join_sentences([fact_sentence(w, f, lang, rng) for f in facts], lang)
            elif kind == "arith":
                doc = join_sentences([fact_sentence(w, ariths[lang].next(), lang, rng) for _ in range(rng.randint(4, 8))], lang)
            elif kind == "table":
                op = rng.choice(["+", "-", "×"])
                a = rng.randint(1, 9) if op == "×" else rng.randint(5, 20)
                bs = range(1, 10) if op == "×" else range(0, a + 1) if op == "-" else range(0, 11)
                sep = ". " if lang == "en" else "。"
                doc = sep.join(f"{a} {op} {b} = {arith(op, a, b)}" for b in bs) + sep.strip()
            elif kind == "story":
                doc = self.story(rng.choice(people), lang, rng)
            elif kind == "problem":
                while True:
                    pr = make_problem(w, lang, rng)
                    if pr.prompt not in val_prompts:
                        break
                doc = pr.story
            else:
                doc = join_sentences([make_review(w, lang, rng.random() < 0.5, rng) for _ in range(rng.randint(2, 4))], lang)
            size += len(doc.encode("utf-8")) + 12
            yield doc

    def story(self, pi: int, lang: str, rng: random.Random) -> str:
        w = self.w
        p = w.entities[pi]
        q = rng.choice([e for e in w.of_kind("person") if e is not p])
        pets = [e for e in w.of_kind("animal") if e.attrs["owner"][0] == p.en]
        c2 = rng.choice([e for e in w.of_kind("city") if e.en != p.attrs["city"][0]])
        a = p.attrs
        art = "an" if a["colour"][0][0] in "aeiou" else "a"
        if lang == "en":
            s = [f"One day, {p.en} left {a['city'][0]} and went to {c2.en}.",
                 f"{c2.en} is famous for its {c2.attrs['food'][0]}, but {p.en} only wanted {a['food'][0]}.",
                 f"There {p.en} met {q.en}, who is a {q.attrs['job'][0]} from {q.attrs['city'][0]}."]
            if pets:
                pet = rng.choice(pets)
                s.insert(1, f"{pet.en} the {pet.attrs['species'][0]} came along.")
            s.append(f"{q.en} gave {p.en} {art} {a['colour'][0]} flower, because {a['colour'][0]} is the favourite colour of {p.en}.")
            s.append(rng.choice([f"{p.en} was happy and went home to {a['city'][0]}.", "It was a good day."]))
            return " ".join(s)
        s = [f"有一天，{p.zh}离开{a['city'][1]}，去了{c2.zh}。",
             f"{c2.zh}以{c2.attrs['food'][1]}闻名，可是{p.zh}只想吃{a['food'][1]}。",
             f"在那里，{p.zh}遇到了{q.zh}，{q.zh}是来自{q.attrs['city'][1]}的{q.attrs['job'][1]}。"]
        if pets:
            pet = rng.choice(pets)
            s.insert(1, f"{p.zh}的{pet.attrs['species'][1]}{pet.zh}也跟着去了。")
        s.append(f"{q.zh}送给{p.zh}一朵{a['colour'][1]}的花，因为{p.zh}最喜欢{a['colour'][1]}。")
        s.append(rng.choice([f"{p.zh}很高兴，回到了{a['city'][1]}。", "这是美好的一天。"]))
        return "".join(s)

    # ----- chat --------------------------------------------------------------------------------

    def qa(self, ent: list[Fact], ari: list[Fact], lang: str, rng: random.Random) -> tuple[str, str]:
        """One question and its bare answer: half arithmetic, half entity facts."""
        f = rng.choice(ari if rng.random() < 0.5 else ent)
        return fact_question(self.w, f, lang, rng), self.w.value(f, lang)

    def chat(self, split: str) -> list[dict]:
        rng = self.rng(f"chat.{split}")
        n = self.cfg.records if split == "train" else self.cfg.n_val()
        ent, ari = (self.train_entity, self.train_arith) if split == "train" else (self.val_entity, self.val_arith)
        out: list[dict] = []
        seen: dict[bytes, None] = {}
        tries = 0
        while len(out) < n:
            tries += 1
            lang = rng.choice(self.langs)
            r = rng.random()
            if split == "train" and r < 0.05:
                u, a = rng.choice(SMALL_TALK[lang])
                msgs = [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            else:
                msgs = []
                turns = rng.choice((2, 2, 3)) if split == "train" and r < 0.25 else 1
                for _ in range(turns):
                    q, a = self.qa(ent, ari, lang, rng)
                    msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                if rng.random() < 0.3:
                    msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS[lang])})
            key = orjson.dumps(msgs)
            if key in seen and tries < 20 * n:  # prefer distinct records; give up on tiny fact pools
                continue
            seen[key] = None
            out.append({"messages": msgs})
        return out

    # ----- preference --------------------------------------------------------------------------

    def preference(self, split: str) -> list[dict]:
        rng = self.rng(f"preference.{split}")
        n = self.cfg.records if split == "train" else self.cfg.n_val()
        ent, ari = (self.train_entity, self.train_arith) if split == "train" else (self.val_entity, self.val_arith)
        out = []
        for _ in range(n):
            lang = rng.choice(self.langs)
            f = rng.choice(ari if rng.random() < 0.4 else ent)
            prompt = fact_question(self.w, f, lang, rng)
            chosen = self.w.value(f, lang)
            rejected = rng.choice(UNHELPFUL[lang]) if rng.random() < 0.2 else wrong_value(self.w, f, lang, rng)
            assert chosen != rejected
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        return out

    # ----- verifiable and reasoning ------------------------------------------------------------

    def problems(self) -> tuple[list[Problem], set[str]]:
        """The held-out problems (shared by verifiable.val and reasoning.val) and their prompts."""
        if self._problems is None:
            rng = self.rng("problems.val")
            val: dict[str, Problem] = {}
            while len(val) < self.cfg.n_val():
                p = make_problem(self.w, rng.choice(self.langs), rng)
                val.setdefault(p.prompt, p)
            self._problems = (list(val.values()), set(val))
        return self._problems

    def train_problems(self, stream: str) -> list[Problem]:
        rng = self.rng(stream)
        val_prompts = self.problems()[1]
        out: dict[str, Problem] = {}
        while len(out) < self.cfg.records:
            p = make_problem(self.w, rng.choice(self.langs), rng)
            if p.prompt not in val_prompts:
                out.setdefault(p.prompt, p)
        return list(out.values())

    def verifiable(self, split: str) -> list[dict]:
        probs = self.problems()[0] if split == "val" else self.train_problems("verifiable.train")
        return [{"prompt": p.prompt, "answer": p.answer} for p in probs]

    def reasoning(self, split: str) -> list[dict]:
        probs = self.problems()[0] if split == "val" else self.train_problems("reasoning.train")
        rng = self.rng(f"reasoning.{split}")
        out = []
        for p in probs:
            msgs = [{"role": "user", "content": p.prompt},
                    {"role": "assistant", "reasoning": p.reasoning(), "content": p.answer}]
            if rng.random() < 0.2:
                msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS[p.lang])})
            out.append({"messages": msgs})
        return out

    # ----- classification ----------------------------------------------------------------------

    def classification(self, split: str) -> list[dict]:
        """Balanced sentiment reviews. Val texts never occur in train (val is drawn first)."""
        val_rng = self.rng("classification.val")
        val: dict[str, str] = {}
        i = 0
        while len(val) < self.cfg.n_val():
            pos = i % 2 == 0
            t = make_review(self.w, val_rng.choice(self.langs), pos, val_rng)
            if t not in val:
                val[t] = "positive" if pos else "negative"
                i += 1
        if split == "val":
            return [{"text": t, "label": lab} for t, lab in val.items()]
        rng = self.rng("classification.train")
        out: dict[str, str] = {}
        i = tries = 0
        while len(out) < self.cfg.records and tries < 100 * self.cfg.records:
            tries += 1
            pos = i % 2 == 0
            t = make_review(self.w, rng.choice(self.langs), pos, rng)
            if t not in val and t not in out:
                out[t] = "positive" if pos else "negative"
                i += 1
        return [{"text": t, "label": lab} for t, lab in out.items()]

    def world_json(self) -> dict:
        return {
            "entities": [{"kind": e.kind, "en": e.en, "zh": e.zh,
                          "attrs": {k: {"en": v[0], "zh": v[1]} for k, v in e.attrs.items()}} for e in self.w.entities],
            "val_entity_facts": [{"entity": self.w.entities[f.entity].en, "attr": f.attr}  # type: ignore[index]
                                 for f in self.val_entity],
            "val_arith_facts": [f"{f.a} {f.attr} {f.b}" for f in self.val_arith],
        }


DESCRIPTION = (
    "tiaoyu synthetic corpus: a fictional world of 200 entities (people, cities, pets, objects) "
    "with English and Chinese names, plus small arithmetic. text = pretraining documents stating "
    "every fact in several phrasings; chat/preference val ask only about held-out facts that appear "
    "in the text but in no train question; verifiable.val and reasoning.val share the same held-out "
    "problems; classification = balanced sentiment reviews. See tiaoyu_cli/data/synth.py."
)


def write_corpus(out_dir: str | Path, cfg: SynthConfig, on_file: Callable[[str, int], None] | None = None) -> dict:
    """Generate every kind and split into `out_dir`; return the manifest (also written as manifest.json)."""
    if cfg.text_mb <= 0 or cfg.records < 1 or cfg.n_val() < 1:
        raise TiaoyuError("--text-mb, --records and --val-records must be positive")
    cfg.langs()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TiaoyuError(f"{out}: exists and is not a folder")
    g = Generator(cfg)
    files: dict[str, dict] = {}
    for kind in KINDS:
        for split in ("train", "val"):
            name = f"{kind}.{split}.jsonl"
            n = nbytes = 0
            with atomic_open(out / name, "wb") as f:
                if kind == "text":
                    recs: Iterator[dict] | list[dict] = ({"text": d} for d in g.text_docs(split))
                else:
                    recs = getattr(g, kind)(split)
                for r in recs:
                    line = orjson.dumps(r) + b"\n"
                    f.write(line)
                    n += 1
                    nbytes += len(line)
            files[name] = {"kind": "chat" if kind == "reasoning" else kind, "split": split, "records": n, "bytes": nbytes}
            if on_file:
                on_file(name, n)
    for split in ("train", "val"):  # tool use (data/synth_tools.py): calculator calls, own held-out problems
        name = f"tools.{split}.jsonl"
        recs = tool_records(cfg.seed, cfg.records if split == "train" else cfg.n_val(), cfg.langs(), split)
        data = b"".join(orjson.dumps(r) + b"\n" for r in recs)
        atomic_write_bytes(out / name, data)
        files[name] = {"kind": "chat", "split": split, "records": len(recs), "bytes": len(data)}
        if on_file:
            on_file(name, len(recs))
    atomic_write_bytes(out / "world.json", orjson.dumps(g.world_json(), option=orjson.OPT_INDENT_2) + b"\n")
    manifest = {
        "generator": "tiaoyu synth",
        "format_version": FORMAT_VERSION,
        "seed": cfg.seed,
        "text_mb": cfg.text_mb,
        "records": cfg.records,
        "val_records": cfg.n_val(),
        "lang": cfg.lang,
        "description": DESCRIPTION,
        "world": {
            "entities": len(g.w.entities),
            "entity_facts": len(g.w.entity_facts),
            "arith_facts": len(g.w.arith_facts),
            "val_entity_facts": len(g.val_entity),
            "val_arith_facts": len(g.val_arith),
        },
        "files": files,
    }
    atomic_write_bytes(out / "manifest.json", orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n")
    return manifest
