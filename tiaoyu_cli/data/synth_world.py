"""The fictional world of the synthetic corpus (see data/synth.py): its entities and facts, the
English and Chinese templates that state and ask them, word problems with their steps, and reviews.
Pure functions of a seed: the same seed gives the same world, sentence for sentence."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

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

# Stories (text documents, synth.Generator.story): {p} visits {c2}, meets {q}, gets a flower of {p}'s colour
STORY = {
    "en": {"visit": ["One day, {p} left {city} and went to {c2}.",
                     "{c2} is famous for its {c2_food}, but {p} only wanted {food}.",
                     "There {p} met {q}, who is a {q_job} from {q_city}."],
           "pet": "{pet} the {species} came along.",
           "flower": "{q} gave {p} {art} {colour} flower, because {colour} is the favourite colour of {p}.",
           "endings": ["{p} was happy and went home to {city}.", "It was a good day."]},
    "zh": {"visit": ["有一天，{p}离开{city}，去了{c2}。",
                     "{c2}以{c2_food}闻名，可是{p}只想吃{food}。",
                     "在那里，{p}遇到了{q}，{q}是来自{q_city}的{q_job}。"],
           "pet": "{p}的{species}{pet}也跟着去了。",
           "flower": "{q}送给{p}一朵{colour}的花，因为{p}最喜欢{colour}。",
           "endings": ["{p}很高兴，回到了{city}。", "这是美好的一天。"]},
}

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
REVIEW_DETAILS = {"en": ("I went there on {day}.", "We were a group of {n}."), "zh": ("我是{day}去的。", "我们一共{n}个人。")}


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


def _review_opening_en(positive: bool, city: str, food: tuple, thing: tuple, rng: random.Random) -> str:
    adjs = rng.sample(POS_EN if positive else NEG_EN, 2)
    subj = rng.choice(SUBJ_EN).format(food=food[0], city=city, thing=thing[0])
    verb = "were" if subj.split(" ")[1] in ("noodles", "dumplings", "apples", "pears") else "was"
    return rng.choice([
        f"{cap(subj)} {verb} {rng.choice(ADV_EN)}{adjs[0]}.",
        f"I thought {subj} {verb} {rng.choice(ADV_EN)}{adjs[0]}.",
        f"{cap(subj)} {verb} {adjs[0]} and {adjs[1]}.",
    ])


def _review_opening_zh(positive: bool, city: str, food: tuple, thing: tuple, rng: random.Random) -> str:
    adjs = rng.sample(POS_ZH if positive else NEG_ZH, 2)
    subj = rng.choice(SUBJ_ZH).format(food=food[1], city=city, thing=thing[1])
    return rng.choice([
        f"{subj}{rng.choice(DEG_ZH)}{adjs[0]}。",
        f"我觉得{subj}{rng.choice(DEG_ZH)}{adjs[0]}。",
        f"{subj}{rng.choice(DEG_ZH)}{adjs[0]}，也{rng.choice(DEG_ZH)}{adjs[1]}。",
    ])


def make_review(w: World, lang: str, positive: bool, rng: random.Random) -> str:
    """An opening sentence that says how it was (in the words of each language), sometimes a detail before
    or after it, often a closing line."""
    city = rng.choice(w.of_kind("city")).name(lang)
    food = rng.choice(FOODS)
    thing = rng.choice(THINGS)
    day = rng.choice(DAYS)
    opening = _review_opening_en if lang == "en" else _review_opening_zh
    sents = [opening(positive, city, food, thing, rng)]
    on_day, group = REVIEW_DETAILS[lang]
    details = [on_day.format(day=day[0] if lang == "en" else day[1]), group.format(n=rng.randint(2, 6))]
    close = rng.choice(CLOSE_POS[lang] if positive else CLOSE_NEG[lang])
    if rng.random() < 0.5:
        sents.insert(rng.randint(0, 1), rng.choice(details))
    if rng.random() < 0.7:
        sents.append(close)
    return join_sentences(sents, lang)
