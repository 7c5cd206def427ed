"""Deterministic demo data: the three tables, with likes drawn from a known model and its truth kept apart.

`generate(scale, seed=...)` returns `user_data`, `post_text_df` and `feed_data` as DataFrames with the
marginals of the real dataset, plus the generator's `GroundTruth`. The truth never goes into the
database: `GroundTruth.save()` writes it to an .npz file that the evaluation's oracle reads back. The
same seed gives identical tables. `python demo_data.py --scale tiny --out DIR` writes CSV files.

The generative model (the demo's contract)
------------------------------------------
Users. user_id runs from 200 with random gaps: at full scale 163,205 ids in 200..168552, at smaller
scales the same share of gaps over a proportionally shorter range. Country from the real shares
(Russia 87.6%, then Ukraine, Belarus, Kazakhstan, Azerbaijan, Turkey, Finland, Cyprus, Switzerland,
Latvia, Estonia). City from a per-country catalogue: capitals with fixed shares (Moscow 13.4% and Saint
Petersburg 4.2% of all users) and a Zipf tail of real and syllable-built names (about 3,900 distinct
cities at full scale). os Android 65% / iOS 35%; source ads 62% / organic 38%; exp_group uniform on
0..4; gender 1 with probability 0.55; age = 14 + lognormal (median 24, mean 27), clipped to 14..95.

Posts. post_id runs from 1 with gaps (7,023 ids in 1..7319 at full scale). Topics keep the real
proportions (movie 3000, covid 1799, business 510, sport 510, politics 417, tech 401, entertainment 386
of 7,023); each topic has 6 or 7 sub-topics. A text is a run of template sentences in its topic's style
(movie reviews, covid tweets with hashtags, news for the rest) whose slots are filled from the
sub-topic's nouns, the topic's nouns, verbs and adjectives, and generic filler: the sub-topic is in the
words, so text embeddings carry it. Lengths run from a few words to a few thousand characters.

Latents (d = 8). Post latent z_p = topic vector + sub-topic vector + small noise. User taste
t_u = (one-hot of age bucket, country, gender, os, exp_group minus its population mean) @ W + individual
noise, so the population's mean taste is zero and no topic is liked more on average.

Likes. A view of post p by user u at time t is liked with probability sigmoid(l), where
    l = b0 + user_bias_u + post_bias_p + hour_effect[topic_p, hour(t)] + <t_u, z_p> + gamma <h_u(t), z_p>
user_bias also depends on the demographics (and source). h_u(t) is the history state: the exponential
moving average h <- decay h + (1 - decay) z_q over the posts q that u liked strictly before t, in time
order, starting from 0 (times at one-second resolution). A pilot run calibrates b0, and per-sub-topic
offsets folded into post_bias, so that about 12% of views are liked in every sub-topic and topic. As
histories fill up, the like rate drifts upwards over the three months (about 10% to 13.5%).

Exposure (which post a view shows). The existing feed is itself a recommender: at time t user u sees
post p with probability proportional to exp(e), where
    e = popularity_p + trend_p tau(week(t)) + alpha <t_u, z_p>
popularity is Zipf-like over a random ranking of the posts, trend a per-post drift over the 13 weeks
(tau runs linearly from -1 to 1 across them). Exposure does not depend on likes, so every view is drawn
first, exactly: a sub-topic, then a post inside it, then a rejection step for the post's own noise.

Activity. A lognormal activity level per user shares out the views (3% of users have none; the total is
exactly Scale.n_views). Views come in sessions (8 views on average, about half a minute apart) that
start on days weighted by growth and weekends and at hours following a daily rhythm; a user's views are
at least 2 s apart.

Feed. A liked view has target=1 and is followed by a 'like' row for the same user and post, 1 s to a
few minutes later but before that user's next view (target 0 on like rows). Rows are sorted by time.

Oracle. `GroundTruth.like_logits` replays h_u(t) from a feed (likes strictly before t) and returns l;
`GroundTruth.like_logit_matrix` the same for every (user, post) at one time (what showing p to u would
bring: the online value of a recommendation); `GroundTruth.score_matrix` returns e + log sigmoid(l):
the log of the expected likes from the old feed's view slot, up to a per-user constant, i.e. the known
model's own ranking. The replay of a feed is kept for the
next call with the same DataFrame object (while it lives and keeps its length): do not edit a feed in
place between calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import time
import weakref
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from fingerprint import tables_fingerprint
from settings import SCALE_NAMES, Settings
from times import DAY_SECONDS

START = datetime(2021, 10, 1)
END = datetime(2021, 12, 29, 23, 59, 59)
SPAN_SECONDS = int((END - START).total_seconds())

WEEK_SECONDS = 7 * DAY_SECONDS
N_DAYS = 90
N_WEEKS = 13
TRUTH_FORMAT = 1

# The real dataset's id ranges: ids are spread over these with gaps.
FULL_USERS, USER_ID_FIRST, USER_ID_LAST = 163_205, 200, 168_552
FULL_POSTS, POST_ID_FIRST, POST_ID_LAST = 7_023, 1, 7_319

COUNTRY_SHARES = {
    "Russia": 0.876,
    "Ukraine": 0.045,
    "Belarus": 0.020,
    "Kazakhstan": 0.015,
    "Azerbaijan": 0.012,
    "Turkey": 0.0095,
    "Finland": 0.0095,
    "Cyprus": 0.004,
    "Switzerland": 0.0035,
    "Latvia": 0.0033,
    "Estonia": 0.0022,
}
# Cities with a fixed share of their country's users (Moscow is 13.4% and Saint Petersburg 4.2% of all).
FIXED_CITIES = {
    "Russia": {"Moscow": 0.134 / 0.876, "Saint Petersburg": 0.042 / 0.876},
    "Ukraine": {"Kyiv": 0.22},
    "Belarus": {"Minsk": 0.35},
    "Kazakhstan": {"Almaty": 0.25},
    "Azerbaijan": {"Baku": 0.45},
    "Turkey": {"Istanbul": 0.30},
    "Finland": {"Helsinki": 0.30},
    "Cyprus": {"Limassol": 0.35},
    "Switzerland": {"Zurich": 0.30},
    "Latvia": {"Riga": 0.55},
    "Estonia": {"Tallinn": 0.45},
}
# Real cities that head each country's Zipf tail, before the syllable-built names.
NAMED_CITIES = {
    "Russia": "Novosibirsk, Yekaterinburg, Kazan, Nizhny Novgorod, Chelyabinsk, Samara, Omsk, "
    "Rostov-on-Don, Ufa, Krasnoyarsk, Voronezh, Perm, Volgograd, Krasnodar, Saratov, Tyumen",
    "Ukraine": "Kharkiv, Odesa, Dnipro, Lviv, Zaporizhzhia, Vinnytsia, Poltava",
    "Belarus": "Gomel, Mogilev, Vitebsk, Grodno, Brest",
    "Kazakhstan": "Nur-Sultan, Shymkent, Karaganda, Aktobe, Pavlodar",
    "Azerbaijan": "Ganja, Sumqayit, Mingachevir",
    "Turkey": "Ankara, Izmir, Antalya, Bursa, Adana",
    "Finland": "Espoo, Tampere, Vantaa, Turku, Oulu",
    "Cyprus": "Nicosia, Larnaca, Paphos, Famagusta, Kyrenia, Paralimni, Ayia Napa, Aradippou, Kiti",
    "Switzerland": "Geneva, Basel, Lausanne, Bern, Winterthur, Lucerne, St. Gallen, Lugano, Biel",
    "Latvia": "Daugavpils, Liepaja, Jelgava, Jurmala, Ventspils, Rezekne, Valmiera, Ogre",
    "Estonia": "Tartu, Narva, Parnu, Kohtla-Jarve, Viljandi, Rakvere, Maardu, Sillamae",
}
# country -> (syllable style, number of syllable-built names in its tail)
SYNTHETIC_CITIES = {
    "Russia": ("ru", 3_300),
    "Ukraine": ("ua", 250),
    "Belarus": ("by", 90),
    "Kazakhstan": ("kz", 100),
    "Azerbaijan": ("az", 25),
    "Turkey": ("tr", 50),
    "Finland": ("fi", 40),
}
# style -> (prefixes, roots, suffixes); a name is prefix + root + suffix, title-cased.
CITY_SYLLABLES = {
    "ru": (
        ", novo, staro, krasno, belo, verkhne, nizhne, ust-, pervo, sosno, lesno, cherno, zlato, sred",
        "gor, lug, dol, vol, kam, yar, bor, rech, pol, ber, lip, dub, tal, mor, zav, kur, sol, mir, vyaz, "
        "ozer, pesch, kol, strel, tver, nar, sev, vetl, yug, kholm, gai, don, rud, ugl, sten, ples, zar",
        "sk, ovsk, insk, ovo, evo, ino, ovka, evka, ograd, ets, any, ishche",
    ),
    "ua": (
        ", novo, staro, velyka , mala , zeleno",
        "olek, petr, bil, hor, lug, dol, kam, yar, bor, lyp, dub, vyn, zol, mykol, ivan, pavl, bohd, sosn, "
        "chern, kozyat, zhyt, vas",
        "ivka, ivtsi, yntsi, ytsia, horod, opil, iv, ove, ychi",
    ),
    "by": (
        ", novo, stary , vialiki ",
        "bar, hom, lid, pin, mal, dzer, kob, slon, vil, zhod, mag, asip, rech, bial, zasl",
        "avichy, ichy, ki, ava, insk, any, ysk",
    ),
    "kz": (
        ", ak, kara, kyzyl, zhana, ust-",
        "tau, kol, bulak, su, tobe, bay, tas, kum, saz, zhar, shu, ter, orda",
        ", sk, ty, ly, kent, bek",
    ),
    "az": (
        ", yeni, boyuk , kichik ",
        "gan, shir, agh, sal, mard, zag, gus, lan, shak, khach, ism, bil",
        "abad, li, chay, kend, ar, an",
    ),
    "tr": (
        ", yeni, kara, ak, eski, bey, gol, kiz",
        "kent, hisar, koy, dere, pinar, ova, tepe, su, kale, yurt, bag, ada",
        ", li, lar, ce, ler, cik",
    ),
    "fi": (
        ", ala, yla, iso, pikku",
        "jarv, kosk, niem, lahd, salm, mak, harj, vaar, lamp, suo, rann, kyl",
        "i, ala, en, io, inen, ela",
    ),
}
CITY_ZIPF, CITY_ZIPF_OFFSET = 1.0, 10.0  # tail weight 1 / (rank + offset): no single giant after the capitals
CITY_NAME_SEED = 20211001  # the catalogue of names is the same for every seed

AGE_MEDIAN_OFFSET, AGE_SIGMA = 10.0, 0.72  # age = 14 + lognormal: median 24, mean 27
AGE_EDGES = (18, 25, 35, 45, 55)
CODE_SIZES = {"age": 6, "country": 11, "gender": 2, "os": 2, "exp_group": 5, "source": 2}
P_MALE, P_ANDROID, P_ADS, P_ACTIVE = 0.55, 0.65, 0.62, 0.97

TOPIC_COUNTS = {
    "movie": 3000,
    "covid": 1799,
    "business": 510,
    "sport": 510,
    "politics": 417,
    "tech": 401,
    "entertainment": 386,
}
TOPIC_STYLE = {"movie": "review", "covid": "tweet"}  # every other topic reads as news
STYLES = ("review", "tweet", "news", "tag")  # "tag" is the hashtag line that may close a tweet

# Sub-topic nouns: what makes a text's sub-topic recoverable.
SUBTOPICS = {
    "movie": {
        "horror": "haunted house, ghost, zombie, vampire, slasher, curse, demon, jump scare, werewolf, "
        "possession, graveyard, masked killer, exorcism, creepy doll",
        "romance": "love story, wedding, first kiss, heartbreak, love triangle, romantic lead, proposal, "
        "summer romance, long-distance relationship, soulmate, bride, honeymoon",
        "comedy": "slapstick, punchline, sitcom humour, stand-up routine, running gag, comic timing, parody, "
        "prank, buddy comedy, one-liner, comedian, spoof",
        "scifi": "spaceship, alien invasion, time travel, robot, distant planet, space station, cyborg, "
        "starship captain, wormhole, dystopia, galaxy, laser battle",
        "crime": "detective, heist, mob boss, murder case, gangster, police chase, bank robbery, "
        "crime scene, drug lord, undercover cop, serial killer, courtroom, hitman",
        "war": "battlefield, soldier, trench, platoon, general, invasion, bomber, sniper, prisoner of war, "
        "resistance fighter, army camp, air raid",
        "animation": "cartoon, animated feature, talking animal, princess, fairy tale, voice cast, "
        "hand-drawn animation, magical kingdom, family adventure, sidekick, musical number",
    },
    "covid": {
        "vaccines": "vaccine, booster shot, second dose, vaccination centre, jab, Pfizer vaccine, "
        "vaccine passport, vaccine rollout, immunity, side effect, vaccination card, Moderna shot",
        "lockdown": "lockdown, curfew, stay-at-home order, closed restaurant, empty street, shutdown, "
        "restriction, reopening plan, social distancing rule, home office",
        "testing": "PCR test, rapid test, test result, testing site, swab, positive test, antigen test, "
        "negative result, contact tracing, test kit",
        "masks": "face mask, mask mandate, respirator, N95 mask, face covering, mask rule, surgical mask, "
        "hand sanitizer, mask shortage",
        "hospitals": "hospital ward, intensive care unit, ventilator, nurse, doctor, hospital bed, "
        "oxygen supply, emergency room, medical staff, ICU patient",
        "variants": "Omicron variant, Delta variant, mutation, new strain, spike protein, "
        "variant of concern, genome sequencing, transmissibility, reinfection",
        "schools": "remote learning, online class, school closure, classroom, student, teacher, "
        "Zoom lecture, exam, campus, homeschooling",
    },
    "business": {
        "markets": "stock market, Dow Jones, FTSE index, trading floor, bond yield, hedge fund, share sale, "
        "stock exchange, equity fund, bear market, dividend",
        "energy": "oil price, crude output, OPEC meeting, gas pipeline, oil field, refinery, "
        "barrel of crude, energy giant, fuel bill, drilling rig",
        "banking": "interest rate, central bank, mortgage lender, inflation figure, bank loan, deposit rate, "
        "rate rise, monetary policy, credit card debt, savings account",
        "retail": "high street, retailer, Christmas trading, shopping centre, supermarket chain, "
        "consumer spending, online shopper, clothing store, discount store, sales figure",
        "airlines": "airline, budget carrier, passenger number, jet fuel, airport, aircraft order, "
        "flight route, Boeing jet, Airbus plane, ticket price",
        "deals": "takeover bid, merger, acquisition, buyout, board of directors, shareholder vote, "
        "chief executive, hostile bid, private equity, rival offer",
        "jobs": "unemployment rate, job cut, labour market, wage growth, factory worker, trade union, "
        "pension scheme, manufacturing output, payroll, strike action",
    },
    "sport": {
        "football": "striker, penalty, goalkeeper, Premiership, transfer window, free kick, midfielder, "
        "stoppage time, Champions League, hat-trick, red card, manager",
        "tennis": "grand slam, baseline rally, second serve, tie-break, Wimbledon final, clay court, ace, "
        "backhand, set point, Davis Cup",
        "athletics": "sprint, marathon, Olympic champion, world record, relay team, hurdles, "
        "indoor championship, long jump, doping test, personal best",
        "rugby": "Six Nations, scrum, try line, fly-half, lineout, tackle, conversion kick, rugby union, "
        "prop forward, Lions tour",
        "cricket": "test series, wicket, batsman, bowler, innings, run chase, spin bowling, century, Ashes, "
        "one-day international",
        "formula_one": "grand prix, pit stop, pole position, racing car, qualifying lap, driver standings, "
        "constructor, tyre strategy, safety car, podium finish",
    },
    "politics": {
        "elections": "general election, polling day, ballot, marginal seat, opinion poll, "
        "election manifesto, candidate, turnout, swing voter, postal vote",
        "immigration": "asylum seeker, border control, immigration rule, work permit, migrant, refugee, "
        "visa system, deportation, citizenship test, points system",
        "tax": "tax cut, budget, chancellor, council tax, public spending, income tax, treasury, "
        "national debt, spending review, tax credit",
        "europe": "European Union, EU constitution, Brussels summit, referendum, single currency, "
        "euro zone, trade agreement, member state, European Commission",
        "health_policy": "waiting list, NHS reform, hospital funding, health secretary, GP surgery, "
        "patient choice, care home, prescription charge, health service",
        "justice": "terror law, ID card, civil liberty, House of Lords, police power, "
        "detention without trial, Human Rights Act, home secretary, court ruling, crime figure",
    },
    "tech": {
        "phones": "mobile phone, smartphone, camera phone, handset, text message, 3G network, "
        "phone operator, touch screen, battery life, ringtone",
        "games": "video game, games console, PlayStation, Xbox, multiplayer game, game developer, gamer, "
        "handheld console, joystick, online gaming",
        "security": "computer virus, spam email, hacker, phishing scam, firewall, spyware, malware, "
        "password, security flaw, identity theft",
        "broadband": "broadband connection, internet provider, download speed, wi-fi hotspot, "
        "fibre network, dial-up, web traffic, broadband subscriber, net access",
        "media": "music download, MP3 player, iPod, digital music, file sharing, online music store, "
        "podcast, digital video recorder, high-definition TV, music piracy",
        "computing": "search engine, artificial intelligence, web browser, open source software, blog, "
        "operating system, chip maker, processor, data centre, supercomputer",
    },
    "entertainment": {
        "music": "album, single, band, singer, rock group, record label, music chart, concert tour, "
        "pop star, rapper, Grammy award",
        "film_industry": "box office, Oscar nomination, Hollywood studio, film festival, director, "
        "blockbuster, actress, Academy Award, red carpet, film premiere",
        "tv": "TV show, reality show, sitcom, talent contest, TV series, soap opera, BBC drama, channel, "
        "viewer ratings, TV presenter",
        "theatre": "West End musical, stage play, theatre production, Broadway show, opera, ballet, "
        "playwright, stage debut, curtain call",
        "books": "novel, bestseller, author, book prize, literary award, publisher, memoir, children's book, "
        "poet, book festival",
        "celebrity": "fashion show, supermodel, celebrity couple, designer, tabloid, paparazzi, "
        "charity gala, style icon, celebrity wedding, magazine cover",
    },
}
HASHTAGS = {
    "vaccines": "vaccinated, boostershot, getvaccinated",
    "lockdown": "lockdown, stayhome, stayathome",
    "testing": "gettested, testing, pcr",
    "masks": "wearamask, masks, maskup",
    "hospitals": "nhs, healthcareheroes, frontline",
    "variants": "omicron, delta, newvariant",
    "schools": "remotelearning, schools, onlineclasses",
}
# topic -> (nouns, adjectives, verbs in the third person singular)
TOPIC_WORDS = {
    "movie": (
        "film, movie, picture, story, plot, script, ending, soundtrack, sequel, scene, screenplay, "
        "camera work, main character",
        "brilliant, boring, predictable, stunning, overrated, underrated, gripping, clumsy, moving, "
        "forgettable, hilarious, painful, beautiful, slow",
        "ruins, carries, saves, elevates, drags down, steals, outshines, wastes, lifts, spoils",
    ),
    "covid": (
        "pandemic, virus, outbreak, infection rate, health crisis, case count, quarantine, second wave, "
        "situation, death toll",
        "worrying, scary, reassuring, exhausting, alarming, encouraging, confusing, serious, mild, "
        "contagious",
        "threatens, overwhelms, protects, slows, tracks, doubles, delays, affects, reaches, worsens",
    ),
    "business": (
        "market, economy, company, profit, investor, share price, quarter, revenue, growth, firm, outlook, "
        "deal",
        "record, weak, strong, sluggish, volatile, profitable, cautious, surprising, modest, bullish",
        "boosts, hits, lifts, drags on, outpaces, weighs on, buys, cuts, raises, reports",
    ),
    "sport": (
        "match, season, team, coach, crowd, championship, victory, defeat, title, game, league, tournament",
        "stunning, dramatic, disappointing, convincing, nervy, historic, impressive, scrappy, tense, "
        "memorable",
        "beats, edges, thrashes, leads, stuns, dominates, frustrates, survives, overtakes, upsets",
    ),
    "politics": (
        "government, minister, party, parliament, electorate, campaign, policy, opposition, leader, debate, "
        "bill, prime minister",
        "controversial, fierce, unpopular, historic, tough, fragile, divisive, cautious, bitter, landmark",
        "criticises, backs, rejects, defends, proposes, attacks, blocks, supports, challenges, promises",
    ),
    "tech": (
        "technology, software, device, user base, gadget, internet, company, computer, service, innovation, "
        "network, industry",
        "new, innovative, cheap, faster, wireless, digital, popular, secure, powerful, portable",
        "launches, unveils, upgrades, replaces, connects, powers, targets, tracks, blocks, supports",
    ),
    "entertainment": (
        "star, show, award, audience, fan base, industry, performance, hit, celebrity, critic, producer, "
        "release",
        "glittering, acclaimed, star-studded, sold-out, popular, controversial, legendary, chart-topping, "
        "emotional, glamorous",
        "wins, tops, celebrates, honours, releases, headlines, stars in, tours, signs, nominates",
    ),
}
GENERIC_ADJECTIVES = (
    "major, surprising, recent, long-awaited, familiar, important, unexpected, remarkable, difficult, "
    "simple, big, small"
)
GENERIC_VERBS = (
    "changes, follows, affects, overshadows, mirrors, reshapes, complicates, highlights, dominates, shapes, "
    "raises questions about, puts pressure on"
)
TIME_PHRASES = (
    "this week, last year, on Monday, on Friday, this morning, again, once more, in recent months, "
    "for the first time, at last, so far this year, over the weekend, last night, today"
)
SOURCES = {
    "review": "my wife, my friend, the critics, everyone I know, my brother, the audience, my kids",
    "tweet": "my doctor, the WHO, the health ministry, my neighbour, the government, experts, my mum",
    "news": "a spokesman, analysts, officials, the BBC, industry experts, a senior source, the report, "
    "campaigners, Reuters",
    "tag": "",
}
# Slots: S sub-topic noun, H sub-topic hashtag, T topic noun, A adjective, V verb, D time phrase,
# P source. Every body template names the sub-topic at least once.
TEMPLATES = {
    "review": (
        "I watched this {T} {D} and the {S} was {A}.",
        "The {S} {V} the {S}, which is {A}.",
        "Honestly, the {A} {S} made the whole {T} worth it.",
        "If you like the {S} and the {S}, this {T} is for you.",
        "The director {V} the {S} and the result is {A}.",
        "{P} thought the {S} was {A}, but the {T} felt {A}.",
        "This is the most {A} {T} about the {S} I have ever seen.",
        "The {T} {V} the {S} {D}.",
        "Do not expect much from the {S}.",
        "The {S} alone is worth the ticket.",
        "Ten out of ten for the {S}!",
        "Sadly the {S} {V} the {T}.",
    ),
    "tweet": (
        "Just got my {S} {D}!",
        "Why is nobody talking about the {S}?",
        "The {S} {V} the {T} {D}.",
        "Stay safe everyone, the {S} is {A}.",
        "{P} says the {S} {V} the {S}.",
        "Another {A} day of {S} and {S}.",
        "So tired of the {S} and the {S}.",
        "{D}: {A} news about the {S}.",
        "Read this thread about the {S} and the {T}.",
    ),
    "news": (
        "The {A} {S} {V} the {T} {D}.",
        "{P} said the {S} {V} the {A} {T}.",
        "It is the {A} {S} since the {S} {V} the {T}.",
        "Critics argue that the {S} {V} the {S}.",
        "{D}, the {T} {V} the {A} {S}.",
        "The {S} and the {S} are expected to dominate the {T}.",
        "The {A} {T} {V} the {S}, according to {P}.",
        "There are signs that the {S} is {A}.",
        "Many people now see the {S} as {A}.",
        "Officials hope the {S} will lift the {T} {D}.",
        "{P} warned that the {S} could hit the {T}.",
        "The {S} {V} the {S} {D}, {P} said.",
    ),
    "tag": ("#covid19 #{H}", "#{H}", "#{H} #stayhome", "#coronavirus #{H} #{H}", "#{H} #covid"),
}
SLOTS = "SHTAVDP"
# style -> (median, sigma) of the lognormal number of body sentences; tweets have 1-3.
SENTENCES = {"review": (6.0, 0.8), "news": (8.0, 0.75)}
MAX_SENTENCES, TAG_PROB, PARAGRAPH_PROB = 80, 0.7, 0.12

# The known model.
LATENT_DIM = 8
TOPIC_SD, SUBTOPIC_SD, POST_NOISE_SD = 0.5, 0.4, 0.12
# one-hot feature -> sd of its rows in W (the demographic part of taste)
TASTE_SD = {"age": 0.25, "country": 0.2, "gender": 0.15, "os": 0.1, "exp_group": 0.15}
TASTE_NOISE_SD = 0.3
USER_BIAS_DEMO_SD, USER_BIAS_SD, POST_BIAS_SD = 0.15, 0.5, 0.2
HOUR_AMPLITUDE = (0.1, 0.3)
GAMMA, DECAY = 0.5, 0.8
TARGET_LIKE_RATE = 0.123
PILOT_USERS, CALIBRATION_ROUNDS = 8_000, 3
SUBTOPIC_PRIOR_VIEWS = 300.0  # a sub-topic's calibration offset shrinks by n / (n + this) pilot views
# Exposure.
ALPHA, POPULARITY_ZIPF, TREND_SD = 0.8, 0.8, 0.4
ACTIVITY_SIGMA = 1.0
SESSION_MEAN_VIEWS, VIEW_GAP_MEAN_S, MIN_VIEW_GAP_S = 8.0, 30.0, 2
LIKE_DELAY_MEDIAN_S, LIKE_DELAY_SIGMA = 25.0, 0.9
HOUR_PROFILE = (
    0.6, 0.35, 0.2, 0.15, 0.15, 0.25, 0.5, 0.8, 1.0, 1.05, 1.1, 1.15,
    1.2, 1.2, 1.15, 1.15, 1.2, 1.3, 1.45, 1.6, 1.7, 1.65, 1.4, 1.0,
)  # fmt: skip
GROWTH, WEEKEND_FACTOR = 0.3, 1.15
SAMPLE_CHUNK_PAIRS = 1 << 16
LOGIT_CHUNK = 1 << 20


@dataclass(frozen=True)
class Scale:
    n_users: int
    n_posts: int
    n_views: int  # views; likes are added on top (about 12% of views)

    def __post_init__(self) -> None:
        if not (10 <= self.n_users < 1 << 20 and self.n_posts >= 10 and self.n_views >= self.n_users):
            raise ValueError(
                f"a scale needs 10 <= n_users < 2^20, n_posts >= 10 and n_views >= n_users, got {self}"
            )


SCALES: dict[str, Scale] = dict(
    zip(
        SCALE_NAMES,  # tiny, small, full
        (
            Scale(n_users=400, n_posts=150, n_views=25_000),
            Scale(n_users=5_000, n_posts=1_000, n_views=270_000),
            Scale(n_users=FULL_USERS, n_posts=FULL_POSTS, n_views=9_150_000),
        ),
        strict=True,
    )
)


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """The known model behind a generated feed: plain numpy arrays and scalars (see the module doc)."""

    user_ids: np.ndarray  # int64 [U], sorted; row i of every user array belongs to user_ids[i]
    taste: np.ndarray  # float64 [U, d]
    user_bias: np.ndarray  # float64 [U]
    post_ids: np.ndarray  # int64 [P], sorted
    post_latent: np.ndarray  # float64 [P, d]
    post_bias: np.ndarray  # float64 [P]
    post_topic: np.ndarray  # int64 [P], index into topic_names
    post_subtopic: np.ndarray  # int64 [P], index into subtopic_names
    topic_names: np.ndarray  # str [T]
    subtopic_names: np.ndarray  # str [S], "topic/sub-topic"
    subtopic_latent: np.ndarray  # float64 [S, d]: topic vector + sub-topic vector
    hour_effect: np.ndarray  # float64 [T, 24]
    popularity: np.ndarray  # float64 [P]
    trend: np.ndarray  # float64 [P]
    b0: float
    gamma: float
    decay: float
    alpha: float
    start_s: int  # START in seconds since the epoch: week 0 of the popularity drift begins here
    # fingerprint.tables_fingerprint of the tables this truth generated ("" in files from before it)
    tables: str = field(default="", compare=False)
    # Replays of feeds already seen (by object identity), so repeated calls on one feed replay once.
    _replays: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def save(self, path: Path) -> None:
        """Write an .npz atomically (a temporary file, then os.replace), creating the folder."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f.name: np.asarray(getattr(self, f.name)) for f in _truth_fields()}
        arrays["tables"] = np.asarray(self.tables)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                np.savez(handle, format=np.asarray(TRUTH_FORMAT), **arrays)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> GroundTruth:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"ground truth file {path} does not exist: generate the demo data first "
                "(python main_script.py demo-data)"
            )
        try:
            with np.load(path, allow_pickle=False) as npz:
                if int(npz["format"]) != TRUTH_FORMAT:
                    raise ValueError(f"format {int(npz['format'])}, expected {TRUTH_FORMAT}")
                values = {f.name: npz[f.name] for f in _truth_fields()}
                values["tables"] = str(npz["tables"]) if "tables" in npz.files else ""
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"ground truth file {path} is corrupt or incomplete: {exc}") from exc
        for name in ("b0", "gamma", "decay", "alpha"):
            values[name] = float(values[name])
        values["start_s"] = int(values["start_s"])
        return cls(**values)

    def like_logits(
        self, user_ids: np.ndarray, post_ids: np.ndarray, times: object, feed: pd.DataFrame
    ) -> np.ndarray:
        """float64 [n]: the true logit of P(like | view) for each (user, post, time).

        times: datetimes (datetime, numpy or pandas) or integers meaning seconds since the epoch; one
        value or one per pair. The history is the user's likes in `feed` strictly before each time.
        """
        user_ids, post_ids = np.atleast_1d(np.asarray(user_ids)), np.atleast_1d(np.asarray(post_ids))
        seconds = _to_seconds(times)
        user_ids, post_ids, seconds = np.broadcast_arrays(user_ids, post_ids, seconds)
        users = _rows_of(self.user_ids, user_ids, "user")
        posts = _rows_of(self.post_ids, post_ids, "post")
        history = _replay(self, feed).state_at(users, seconds)
        base = _base_logit(self, users, posts, seconds) + self.b0
        return base + self.gamma * (history * self.post_latent[posts]).sum(axis=1)

    def like_logit_matrix(
        self, user_ids: np.ndarray, post_ids: np.ndarray, time: object, feed: pd.DataFrame
    ) -> np.ndarray:
        """float64 [len(user_ids), len(post_ids)]: the true logit of P(like | shown) of every (user, post)
        at `time` (a datetime or epoch seconds), history from `feed` strictly before it: what showing a
        post would bring, the online value of a recommendation."""
        users, posts, seconds = self._matrix_rows(user_ids, post_ids, time)
        history = _replay(self, feed).state_at(users, np.full(len(users), seconds))
        latent = self.post_latent[posts]
        hour = (seconds // 3600) % 24
        post_part = self.post_bias[posts] + self.hour_effect[self.post_topic[posts], hour]
        like = self.b0 + self.user_bias[users][:, None] + post_part + self.taste[users] @ latent.T
        return like + self.gamma * (history @ latent.T)

    def score_matrix(
        self, user_ids: np.ndarray, post_ids: np.ndarray, time: object, feed: pd.DataFrame
    ) -> np.ndarray:
        """float64 [len(user_ids), len(post_ids)]: the oracle's ranking score at `time`.

        exposure logit + log sigmoid(like logit) = log of the expected likes from one view slot, up to a
        per-user constant: the old feed's own ranking. History from `feed` strictly before `time`.
        """
        users, posts, seconds = self._matrix_rows(user_ids, post_ids, time)
        like = self.like_logit_matrix(user_ids, post_ids, time, feed)
        week = int(np.clip((seconds - self.start_s) // WEEK_SECONDS, 0, N_WEEKS - 1))
        affinity = self.taste[users] @ self.post_latent[posts].T
        exposure = self.popularity[posts] + self.trend[posts] * _tau()[week] + self.alpha * affinity
        return exposure - np.logaddexp(0.0, -like)

    def _matrix_rows(self, user_ids: np.ndarray, post_ids: np.ndarray, time: object) -> tuple:
        users = _rows_of(self.user_ids, np.atleast_1d(np.asarray(user_ids)), "user")
        posts = _rows_of(self.post_ids, np.atleast_1d(np.asarray(post_ids)), "post")
        seconds = _to_seconds(time)
        if seconds.size != 1:
            raise ValueError(f"a score matrix takes one time, got {seconds.size}")
        return users, posts, int(seconds.ravel()[0])


@dataclass(frozen=True, eq=False)
class _Replay:
    """The history states after each like of a feed, with the lookup 'last like strictly before t'."""

    key: np.ndarray  # int64 [L]: user row << 32 | like time in seconds, sorted (by user, then time)
    state: np.ndarray  # float64 [L, d]: h just after this like

    def state_at(self, users: np.ndarray, seconds: np.ndarray) -> np.ndarray:
        out = np.zeros((len(users), self.state.shape[1]))
        if not len(self.key):
            return out
        query = users.astype(np.int64) << 32 | np.clip(seconds, 0, (1 << 32) - 1)
        # side="left": a like at exactly t sorts at the query itself and so is not history for t.
        last = np.searchsorted(self.key, query, side="left") - 1
        found = (last >= 0) & (self.key[np.maximum(last, 0)] >> 32 == users)
        out[found] = self.state[last[found]]
        return out


@dataclass
class DemoData:
    users: pd.DataFrame  # user_data columns
    posts: pd.DataFrame  # post_text_df columns
    feed: pd.DataFrame  # feed_data columns, sorted by timestamp
    truth: GroundTruth
    like_logit: np.ndarray  # float64 [len(feed)]: the generator's like logit of each view, NaN on likes


# ----------------------------------------------------------------------------- small helpers


def _truth_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(GroundTruth) if not f.name.startswith("_") and f.name != "tables"]


def _split(words: str) -> list[str]:
    return [w.strip() for w in words.split(",") if w.strip()]


def _tau() -> np.ndarray:
    return np.linspace(-1.0, 1.0, N_WEEKS)


def _start_s() -> int:
    return int(np.datetime64(START, "s").astype(np.int64))


def _to_seconds(times: object) -> np.ndarray:
    """int64 seconds since the epoch from datetimes of any flavour, or from integer seconds."""
    values = np.atleast_1d(np.asarray(times))
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    stamps = pd.to_datetime(values.ravel())
    if stamps.tz is not None:
        raise ValueError("times must be naive (the feed's timestamps are naive), got a timezone")
    if stamps.isna().any():
        raise ValueError("times must not be missing")
    return (stamps.as_unit("ns").asi8 // 1_000_000_000).reshape(values.shape)  # floor, as the feed's


def _rows_of(sorted_ids: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
    """Row of each id in the sorted id array; unknown ids are an error."""
    ids = ids.astype(np.int64)
    rows = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    unknown = sorted_ids[rows] != ids
    if unknown.any():
        raise ValueError(f"{unknown.sum()} {what} ids are not in the ground truth, e.g. {ids[unknown][:5]}")
    return rows


def _ranges(lo: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Concatenation of arange(lo[i], lo[i] + n[i]) over i."""
    ends = np.cumsum(n)
    return np.repeat(lo - (ends - n), n) + np.arange(ends[-1] if len(ends) else 0)


def _inverse_cdf(
    cum: np.ndarray, lo: np.ndarray, hi: np.ndarray, u: np.ndarray, *, last_positive: np.ndarray | None = None
) -> np.ndarray:
    """Index in [lo, hi) drawn with weights diff(cum) by the uniforms u (cum: running total, float64).

    Rounding can carry a draw past the segment's end; with zero weights there, last_positive (the
    index of the last positive weight up to each index) moves it back onto a possible outcome.
    """
    base = np.where(lo > 0, cum[np.maximum(lo - 1, 0)], 0.0)
    pos = np.clip(np.searchsorted(cum, base + u * (cum[hi - 1] - base), side="right"), lo, hi - 1)
    return pos if last_positive is None else last_positive[pos]


def _spread_ids(n: int, *, first: int, last_full: int, n_full: int, rng: np.random.Generator) -> np.ndarray:
    """n sorted unique ids from `first` with the full dataset's share of gaps."""
    span = max(n, round(n * (last_full - first + 1) / n_full))
    inner = rng.choice(np.arange(1, span - 1), size=n - 2, replace=False)
    return first + np.sort(np.concatenate([[0, span - 1], inner])).astype(np.int64)


# ----------------------------------------------------------------------------- users


def _city_catalogue() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(names, country index, share within the country), grouped by country in COUNTRY_SHARES order."""
    rng = np.random.default_rng(CITY_NAME_SEED)
    names, country, share = [], [], []
    for c, name in enumerate(COUNTRY_SHARES):  # a loop over the 11 countries
        fixed = FIXED_CITIES[name]
        tail = _split(NAMED_CITIES[name])
        if name in SYNTHETIC_CITIES:
            style, n_tail = SYNTHETIC_CITIES[name]
            prefixes, roots, suffixes = (np.array(s.split(","), dtype=str) for s in CITY_SYLLABLES[style])
            prefixes, suffixes = np.char.lstrip(prefixes), np.char.strip(suffixes)
            combos = np.char.add(np.char.add(prefixes[:, None, None], np.char.strip(roots)[None, :, None]),
                                 suffixes[None, None, :]).ravel()  # fmt: skip
            combos = pd.unique(np.char.title(combos[rng.permutation(len(combos))]))
            combos = combos[~np.isin(combos, [*fixed, *tail])]
            assert len(combos) >= n_tail, f"{style} syllables give only {len(combos)} names, need {n_tail}"
            tail += combos[:n_tail].tolist()
        zipf = 1.0 / (np.arange(1, len(tail) + 1) + CITY_ZIPF_OFFSET) ** CITY_ZIPF
        rest = 1.0 - sum(fixed.values())
        names += [*fixed, *tail]
        country += [c] * (len(fixed) + len(tail))
        share += [*fixed.values(), *(rest * zipf / zipf.sum())]
    return np.array(names, dtype=object), np.array(country), np.array(share)


def _make_users(scale: Scale, rng: np.random.Generator) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The user_data table and the integer codes of the demographics that shape taste."""
    n = scale.n_users
    ids = _spread_ids(n, first=USER_ID_FIRST, last_full=USER_ID_LAST, n_full=FULL_USERS, rng=rng)
    countries = np.array(list(COUNTRY_SHARES), dtype=object)
    shares = np.array(list(COUNTRY_SHARES.values()))
    country = rng.choice(len(countries), size=n, p=shares / shares.sum())
    city_names, city_country, city_share = _city_catalogue()
    city_lo = np.searchsorted(city_country, np.arange(len(countries)))
    city_hi = np.searchsorted(city_country, np.arange(len(countries)), side="right")
    city = _inverse_cdf(np.cumsum(city_share), city_lo[country], city_hi[country], rng.random(n))
    age = np.clip(np.rint(14 + AGE_MEDIAN_OFFSET * np.exp(AGE_SIGMA * rng.standard_normal(n))), 14, 95)
    codes = {
        "age": np.digitize(age, AGE_EDGES),
        "country": country,
        "gender": (rng.random(n) < P_MALE).astype(np.int64),
        "os": (rng.random(n) >= P_ANDROID).astype(np.int64),
        "exp_group": rng.integers(0, 5, size=n),
        "source": (rng.random(n) >= P_ADS).astype(np.int64),
    }
    users = pd.DataFrame(
        {
            "user_id": ids,
            "gender": codes["gender"],
            "age": age.astype(np.int64),
            "country": pd.Series(countries[country], dtype="str"),
            "city": pd.Series(city_names[city], dtype="str"),
            "exp_group": codes["exp_group"].astype(np.int64),
            "os": pd.Series(np.array(["Android", "iOS"], dtype=object)[codes["os"]], dtype="str"),
            "source": pd.Series(np.array(["ads", "organic"], dtype=object)[codes["source"]], dtype="str"),
        }
    )
    return users, codes


def _one_hot(codes: dict[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    """Centred one-hot of the named codes: its mean over the population is zero."""
    onehot = np.concatenate([np.eye(CODE_SIZES[name])[codes[name]] for name in names], axis=1)
    return onehot - onehot.mean(axis=0)


# ----------------------------------------------------------------------------- posts and texts


def _subtopic_table() -> tuple[np.ndarray, np.ndarray]:
    """(topic index of each sub-topic, "topic/sub-topic" names), in SUBTOPICS order."""
    topics = list(TOPIC_COUNTS)
    pairs = [(topics.index(t), f"{t}/{s}") for t in SUBTOPICS for s in SUBTOPICS[t]]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def _make_posts(scale: Scale, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(post ids, topic index, sub-topic index) with the real topic proportions."""
    n = scale.n_posts
    ids = _spread_ids(n, first=POST_ID_FIRST, last_full=POST_ID_LAST, n_full=FULL_POSTS, rng=rng)
    share = np.array(list(TOPIC_COUNTS.values()), dtype=float) * n / sum(TOPIC_COUNTS.values())
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(counts - share, kind="stable")[: n - counts.sum()]] += 1  # largest remainders
    topic = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    sub_topic, _ = _subtopic_table()
    # Within a topic, sub-topics get uneven shares (at tiny scale a small one may stay empty).
    weight = rng.gamma(3.0, size=len(sub_topic))
    lo, hi = np.searchsorted(sub_topic, topic), np.searchsorted(sub_topic, topic, side="right")
    return ids, topic, _inverse_cdf(np.cumsum(weight), lo, hi, rng.random(n))


def _word_bank(slot: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(words, start, count) per group of a slot: sub-topic (S, H), topic (T, A, V), style (P), one (D)."""
    topics, subs = list(TOPIC_COUNTS), [name.split("/")[1] for name in _subtopic_table()[1]]
    sub_topic = [t for t in SUBTOPICS for _ in SUBTOPICS[t]]
    groups = {
        "S": [_split(SUBTOPICS[t][s]) for t, s in zip(sub_topic, subs, strict=True)],
        "H": [
            _split(HASHTAGS.get(s, "")) if t == "covid" else [] for t, s in zip(sub_topic, subs, strict=True)
        ],
        "T": [_split(TOPIC_WORDS[t][0]) for t in topics],
        "A": [_split(TOPIC_WORDS[t][1]) + _split(GENERIC_ADJECTIVES) for t in topics],
        "V": [_split(TOPIC_WORDS[t][2]) + _split(GENERIC_VERBS) for t in topics],
        "D": [_split(TIME_PHRASES)],
        "P": [_split(SOURCES[s]) for s in STYLES],
    }[slot]
    count = np.array([len(g) for g in groups])
    return np.array(list(itertools.chain(*groups)), dtype=object), np.cumsum(count) - count, count


def _template_table() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Templates as token grids: (slot index or -1, literal, text before, text after) and style starts."""
    flat = [t.split() for style in STYLES for t in TEMPLATES[style]]
    width = max(len(t) for t in flat)
    slot = np.full((len(flat), width), -1)
    literal, before, after = (np.full((len(flat), width), "", dtype=object) for _ in range(3))
    for i, tokens in enumerate(flat):  # a loop over the few dozen templates, not over data
        for j, token in enumerate(tokens):
            match = re.fullmatch(r"(.*)\{([A-Z])\}(.*)", token)
            if match:
                slot[i, j] = SLOTS.index(match[2])
                before[i, j], after[i, j] = match[1], match[3]
            else:
                literal[i, j] = token
    sizes = np.array([len(TEMPLATES[s]) for s in STYLES])
    return slot, literal, before, after, np.cumsum(sizes) - sizes


def _make_texts(topic: np.ndarray, subtopic: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One English-ish text per post, in its topic's style, naming its sub-topic throughout."""
    n = len(topic)
    topic_names = list(TOPIC_COUNTS)
    style_of_topic = np.array([STYLES.index(TOPIC_STYLE.get(t, "news")) for t in topic_names])
    style = style_of_topic[topic]
    median = np.array([SENTENCES.get(s, (1.0, 0.0))[0] for s in STYLES])[style]
    sigma = np.array([SENTENCES.get(s, (1.0, 0.0))[1] for s in STYLES])[style]
    body = np.clip(np.rint(median * np.exp(sigma * rng.standard_normal(n))), 1, MAX_SENTENCES).astype(
        np.int64
    )
    is_tweet = style == STYLES.index("tweet")
    body = np.where(is_tweet, 1 + rng.binomial(2, 0.35, size=n), body)
    has_tag = is_tweet & (rng.random(n) < TAG_PROB)
    n_sent = body + has_tag
    post = np.repeat(np.arange(n), n_sent)
    first = np.cumsum(n_sent) - n_sent
    last = np.arange(len(post)) == (first + n_sent - 1)[post]
    pool = np.where(last & has_tag[post], STYLES.index("tag"), style[post])

    slot_grid, literal_grid, before_grid, after_grid, pool_start = _template_table()
    pool_size = np.array([len(TEMPLATES[s]) for s in STYLES])
    template = pool_start[pool] + (rng.random(len(post)) * pool_size[pool]).astype(np.int64)
    slots, tokens = slot_grid[template], literal_grid[template].copy()
    group = {"S": subtopic[post], "H": subtopic[post], "T": topic[post], "A": topic[post],
             "V": topic[post], "D": np.zeros(len(post), np.int64), "P": pool}  # fmt: skip
    for k, name in enumerate(SLOTS):  # a loop over the seven slot kinds, vectorised over sentences
        is_slot = slots == k
        rows, cols = np.nonzero(is_slot)
        words, start, count = _word_bank(name)
        g = group[name][rows]
        assert (count[g] > 0).all(), f"slot {name} is used where its word bank is empty"
        # The j-th slot of a kind in a sentence takes word (first + j * stride) mod count: repeats of a
        # slot in one sentence ("the {S} and the {S}") then name different words.
        nth = np.cumsum(is_slot, axis=1)[rows, cols] - 1
        first_word = (rng.random(len(post)) * count[group[name]]).astype(np.int64)[rows]
        stride = 1 + (rng.random(len(post)) * np.maximum(count[group[name]] - 1, 1)).astype(np.int64)[rows]
        pick = start[g] + (first_word + nth * stride) % count[g]
        tokens[rows, cols] = (
            before_grid[template[rows], cols] + words[pick] + after_grid[template[rows], cols]
        )
    sentence = tokens[:, 0]
    for j in range(1, tokens.shape[1]):  # a loop over token positions
        sentence = sentence + np.where(tokens[:, j] == "", "", " ").astype(object) + tokens[:, j]
    capital = pd.Series(sentence, dtype="str")
    capital = (capital.str[:1].str.upper() + capital.str[1:]).to_numpy(dtype=object)
    paragraph = (rng.random(len(post)) < PARAGRAPH_PROB) & ~is_tweet[post]
    sep = np.where(last, "", np.where(paragraph, "\n\n", " ")).astype(object)
    return np.add.reduceat(capital + sep, first)


# ----------------------------------------------------------------------------- the known model


def _make_truth(
    codes: dict[str, np.ndarray], user_ids: np.ndarray, post_ids: np.ndarray, topic: np.ndarray,
    subtopic: np.ndarray, rng: np.random.Generator,
) -> GroundTruth:  # fmt: skip
    d, n_topics = LATENT_DIM, len(TOPIC_COUNTS)
    sub_topic, sub_names = _subtopic_table()
    topic_vec = TOPIC_SD * rng.standard_normal((n_topics, d))
    sub_latent = topic_vec[sub_topic] + SUBTOPIC_SD * rng.standard_normal((len(sub_topic), d))
    post_latent = sub_latent[subtopic] + POST_NOISE_SD * rng.standard_normal((len(post_ids), d))
    demo = _one_hot(codes, tuple(TASTE_SD))
    sd = np.concatenate([np.full(CODE_SIZES[name], value) for name, value in TASTE_SD.items()])
    weights = sd[:, None] * rng.standard_normal((len(sd), d))
    taste = demo @ weights + TASTE_NOISE_SD * rng.standard_normal((len(user_ids), d))
    demo_bias = _one_hot(codes, (*TASTE_SD, "source"))
    user_bias = demo_bias @ (USER_BIAS_DEMO_SD * rng.standard_normal(demo_bias.shape[1]))
    user_bias += USER_BIAS_SD * rng.standard_normal(len(user_ids))
    amplitude = rng.uniform(*HOUR_AMPLITUDE, size=n_topics)
    phase = rng.uniform(0, 24, size=n_topics)
    hour_effect = amplitude[:, None] * np.cos(2 * np.pi * (np.arange(24)[None, :] - phase[:, None]) / 24)
    return GroundTruth(
        user_ids=user_ids,
        taste=taste,
        user_bias=user_bias,
        post_ids=post_ids,
        post_latent=post_latent,
        post_bias=POST_BIAS_SD * rng.standard_normal(len(post_ids)),
        post_topic=topic.astype(np.int64),
        post_subtopic=subtopic.astype(np.int64),
        topic_names=np.array(list(TOPIC_COUNTS)),
        subtopic_names=sub_names,
        subtopic_latent=sub_latent,
        hour_effect=hour_effect,
        popularity=-POPULARITY_ZIPF * np.log1p(rng.permutation(len(post_ids))),
        trend=TREND_SD * rng.standard_normal(len(post_ids)),
        b0=0.0,
        gamma=GAMMA,
        decay=DECAY,
        alpha=ALPHA,
        start_s=_start_s(),
    )


def _base_logit(truth: GroundTruth, users: np.ndarray, posts: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """The like logit without b0 and without the history term, in chunks to bound memory."""
    out = np.empty(len(users))
    for lo in range(0, len(users), LOGIT_CHUNK):  # a loop over chunks of a million
        u, p = users[lo : lo + LOGIT_CHUNK], posts[lo : lo + LOGIT_CHUNK]
        hour = (seconds[lo : lo + LOGIT_CHUNK] // 3600) % 24
        affinity = (truth.taste[u] * truth.post_latent[p]).sum(axis=1)
        out[lo : lo + LOGIT_CHUNK] = (
            truth.user_bias[u] + truth.post_bias[p] + truth.hour_effect[truth.post_topic[p], hour] + affinity
        )
    return out


def _replay(truth: GroundTruth, feed: pd.DataFrame) -> _Replay:
    """History states after every like in `feed`, replayed once per feed object."""
    key = id(feed)
    cached = truth._replays.get(key)
    if cached is not None and cached[0]() is feed and cached[1] == len(feed):
        return cached[2]
    missing = {"timestamp", "user_id", "post_id", "action"} - set(feed.columns)
    if missing:
        raise ValueError(f"feed lacks the columns {sorted(missing)}")
    likes = feed.loc[(feed["action"] == "like").to_numpy(), ["timestamp", "user_id", "post_id"]]
    user_ids = likes["user_id"].to_numpy(np.int64)
    known = np.isin(user_ids, truth.user_ids)  # likes of users outside the truth cannot matter
    users = _rows_of(truth.user_ids, user_ids[known], "user")
    posts = _rows_of(truth.post_ids, likes["post_id"].to_numpy(np.int64)[known], "post")
    seconds = _to_seconds(likes["timestamp"].to_numpy())[known]
    if len(seconds) and not (seconds.min() >= 0 and seconds.max() < 1 << 32):
        raise ValueError("like timestamps must lie between 1970 and 2106")
    order = np.lexsort((seconds, users))
    users, posts, seconds = users[order], posts[order], seconds[order]
    first = np.r_[True, users[1:] != users[:-1]] if len(users) else np.zeros(0, bool)
    rank = np.arange(len(users)) - np.maximum.accumulate(np.where(first, np.arange(len(users)), 0))
    state = np.zeros((len(users), truth.post_latent.shape[1]))
    by_rank = np.argsort(rank, kind="stable")
    bounds = np.searchsorted(rank[by_rank], np.arange(rank.max() + 2 if len(rank) else 1))
    for r in range(len(bounds) - 1):  # a loop over like ranks, vectorised across users
        rows = by_rank[bounds[r] : bounds[r + 1]]
        previous = state[rows - 1] if r else np.zeros((len(rows), state.shape[1]))
        state[rows] = truth.decay * previous + (1 - truth.decay) * truth.post_latent[posts[rows]]
    replay = _Replay(key=users << 32 | seconds, state=state)
    truth._replays.clear()  # keep one feed's replay: feeds are big
    truth._replays[key] = (weakref.ref(feed), len(feed), replay)
    return replay


# ----------------------------------------------------------------------------- activity and exposure


def _view_times(scale: Scale, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(user row, seconds after START) of every view, grouped by user and increasing within a user."""
    n_users = scale.n_users
    active = rng.random(n_users) < P_ACTIVE
    active[rng.integers(n_users)] = True  # at least one user views
    activity = np.exp(ACTIVITY_SIGMA * rng.standard_normal(n_users)) * active
    per_user = active + rng.multinomial(scale.n_views - active.sum(), activity / activity.sum())
    user = np.repeat(np.arange(n_users), per_user)
    n = len(user)
    user_first = np.cumsum(per_user) - per_user
    new_session = rng.random(n) < 1.0 / SESSION_MEAN_VIEWS
    new_session[user_first[per_user > 0]] = True
    session = np.cumsum(new_session) - 1
    session_user = user[new_session]
    # Session starts: a day weighted by growth and weekends, an hour by the daily rhythm.
    day = np.arange(N_DAYS)
    weekday = (day + START.weekday()) % 7
    day_weight = (1 + GROWTH * day / (N_DAYS - 1)) * np.where(weekday >= 5, WEEKEND_FACTOR, 1.0)
    hour_weight = np.array(HOUR_PROFILE)
    n_sessions = len(session_user)
    starts = (
        rng.choice(N_DAYS, size=n_sessions, p=day_weight / day_weight.sum()) * DAY_SECONDS
        + rng.choice(24, size=n_sessions, p=hour_weight / hour_weight.sum()) * 3600
        + rng.integers(0, 3600, size=n_sessions)
    )
    # A user's sessions in time order: sort the starts within each user.
    starts = np.sort(session_user * (1 << 23) + starts) - session_user * (1 << 23)
    gap = np.where(new_session, 0, MIN_VIEW_GAP_S + np.rint(rng.exponential(VIEW_GAP_MEAN_S, size=n)))
    offset = np.cumsum(gap) - np.cumsum(gap)[np.flatnonzero(new_session)][session]
    seconds = (starts[session] + offset).astype(np.int64)
    # Sessions may overlap: push views apart to MIN_VIEW_GAP_S (running max of t_i - gap * i per user) ...
    i = np.arange(n, dtype=np.int64) - user_first[user]  # index within the user
    shift = user.astype(np.int64) << 26  # exceeds the range of t - gap * i, so the max restarts per user
    seconds = np.maximum.accumulate(seconds - MIN_VIEW_GAP_S * i + shift) - shift + MIN_VIEW_GAP_S * i
    # ... and keep the last view a second before END (room for its like), pulling earlier ones back.
    after = per_user[user] - 1 - i
    seconds = np.minimum(seconds, SPAN_SECONDS - 1 - MIN_VIEW_GAP_S * after)
    return user, seconds


def _sample_posts(
    truth: GroundTruth, user: np.ndarray, seconds: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The post of each view, drawn exactly from softmax over posts of the exposure logit.

    Proposal: a sub-topic s with weight exp(alpha <t_u, c_s>) * sum_{p in s} exp(popularity_p(week)),
    then a post p in s with weight exp(popularity_p(week)). Acceptance exp(alpha <t_u, z_p - c_s> - bound)
    turns it into the exposure distribution; the bound is alpha |t_u| max_p |z_p - c_s|.
    """
    n_posts, n_subs = len(truth.post_ids), len(truth.subtopic_names)
    week = np.minimum(seconds // WEEK_SECONDS, N_WEEKS - 1)
    noise = truth.post_latent - truth.subtopic_latent[truth.post_subtopic]
    bound = truth.alpha * np.linalg.norm(truth.taste, axis=1) * np.linalg.norm(noise, axis=1).max()
    sub_affinity = truth.alpha * truth.taste @ truth.subtopic_latent.T
    sub_weight = np.exp(sub_affinity - sub_affinity.max(axis=1, keepdims=True))  # [U, S]
    log_pop = truth.popularity[None, :] + truth.trend[None, :] * _tau()[:, None]  # [W, P]
    by_sub = np.argsort(truth.post_subtopic, kind="stable")
    post_weight = np.exp(log_pop[:, by_sub] - log_pop.max())
    post_weight /= post_weight.sum(axis=1, keepdims=True)
    sub_mass = post_weight @ np.eye(n_subs)[truth.post_subtopic[by_sub]]  # [W, S]
    post_cum = np.cumsum(post_weight.ravel())
    sub_lo = np.searchsorted(truth.post_subtopic[by_sub], np.arange(n_subs))
    sub_hi = np.searchsorted(truth.post_subtopic[by_sub], np.arange(n_subs), side="right")
    # Views of one (user, week) pair share the sub-topic weights; pairs are contiguous.
    pair_key = user.astype(np.int64) * N_WEEKS + week
    pair_start = np.flatnonzero(np.r_[True, pair_key[1:] != pair_key[:-1]])
    pair = np.cumsum(np.r_[True, pair_key[1:] != pair_key[:-1]]) - 1
    out = np.empty(len(user), dtype=np.int64)
    for a in range(0, len(pair_start), SAMPLE_CHUNK_PAIRS):  # a loop over chunks of pairs
        b = min(a + SAMPLE_CHUNK_PAIRS, len(pair_start))
        rows = pair_start[a:b]
        weight = sub_weight[user[rows]] * sub_mass[week[rows]]
        weight = (weight / weight.sum(axis=1, keepdims=True)).ravel()
        sub_cum = np.cumsum(weight)
        last_positive = np.maximum.accumulate(np.where(weight > 0, np.arange(len(weight)), 0))
        pending = np.arange(rows[0], pair_start[b] if b < len(pair_start) else len(user))
        while len(pending):  # rejection rounds: each accepts about half of what is left
            local = (pair[pending] - a) * n_subs
            draw = rng.random(len(pending))
            sub = _inverse_cdf(sub_cum, local, local + n_subs, draw, last_positive=last_positive) - local
            w = week[pending] * n_posts
            post = by_sub[
                _inverse_cdf(post_cum, w + sub_lo[sub], w + sub_hi[sub], rng.random(len(pending))) - w
            ]
            u = user[pending]
            log_accept = truth.alpha * (truth.taste[u] * noise[post]).sum(axis=1) - bound[u]
            accept = np.log(rng.random(len(pending))) < log_accept
            out[pending[accept]] = post[accept]
            pending = pending[~accept]
    return out


# ----------------------------------------------------------------------------- likes


def _simulate_likes(
    static: np.ndarray, post: np.ndarray, user_first: np.ndarray, per_user: np.ndarray,
    uniform: np.ndarray, truth: GroundTruth, *, progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(logit, liked) of every view: views grouped by user in time order, history carried step by step."""
    order = np.argsort(-per_user, kind="stable")
    first, count = user_first[order], per_user[order]
    n_steps = int(count[0]) if len(count) else 0
    active = np.searchsorted(-count, -np.arange(n_steps), side="left")  # users with more than k views
    state = np.zeros((len(order), truth.post_latent.shape[1]))
    logit = np.empty(len(static))
    liked = np.zeros(len(static), dtype=bool)
    with tqdm(total=len(static), desc="likes", unit="view", disable=not progress, leave=False) as bar:
        for k in range(n_steps):  # a loop over each user's k-th view, vectorised across users
            m = active[k]
            view = first[:m] + k
            latent = truth.post_latent[post[view]]
            h = state[:m]
            step_logit = static[view] + truth.gamma * (h * latent).sum(axis=1)
            like = uniform[view] < 1.0 / (1.0 + np.exp(-step_logit))
            logit[view], liked[view] = step_logit, like
            h[like] = truth.decay * h[like] + (1 - truth.decay) * latent[like]
            bar.update(m)
    return logit, liked


def _group_shift(
    logit: np.ndarray, group: np.ndarray, n_groups: int, *, prior_views: float = 0.0
) -> np.ndarray:
    """Per group, delta with mean(sigmoid(logit + delta)) = TARGET_LIKE_RATE over the group's views.

    Newton's method, vectorised over groups; each delta shrinks towards 0 by n / (n + prior_views).
    """
    count = np.bincount(group, minlength=n_groups).astype(float)
    delta = np.zeros(n_groups)
    for _ in range(50):  # Newton iterations
        p = 1.0 / (1.0 + np.exp(-(logit + delta[group])))
        excess = np.bincount(group, p, n_groups) - TARGET_LIKE_RATE * count
        slope = np.bincount(group, p * (1 - p), n_groups)
        step = np.where(slope > 0, excess / np.maximum(slope, 1e-12), 0.0)
        delta -= step
        if np.abs(step).max() < 1e-10:
            break
    return delta * count / (count + prior_views)


def _calibrate(
    truth: GroundTruth, user: np.ndarray, post: np.ndarray, seconds: np.ndarray, user_first: np.ndarray,
    per_user: np.ndarray, uniform: np.ndarray, rng: np.random.Generator,
) -> GroundTruth:  # fmt: skip
    """b0 for TARGET_LIKE_RATE overall, and per-sub-topic offsets (folded into post_bias) for the same
    rate in every sub-topic, fitted on a pilot of users whose history feeds back into the rates."""
    pilot = np.sort(rng.choice(len(per_user), size=min(PILOT_USERS, len(per_user)), replace=False))
    pilot = pilot[per_user[pilot] > 0]
    views = _ranges(user_first[pilot], per_user[pilot])
    pilot_first = np.cumsum(per_user[pilot]) - per_user[pilot]
    sub = truth.post_subtopic[post[views]]
    n_subs = len(truth.subtopic_names)
    for round_ in range(CALIBRATION_ROUNDS + 1):  # round 0 ignores the history, later rounds replay it
        static = _base_logit(truth, user[views], post[views], seconds[views]) + truth.b0
        logit = static
        if round_:
            logit, _ = _simulate_likes(
                static, post[views], pilot_first, per_user[pilot], uniform[views], truth
            )
        delta = _group_shift(logit, sub, n_subs, prior_views=SUBTOPIC_PRIOR_VIEWS)
        delta -= delta[sub].mean()  # b0 carries the overall level
        level = _group_shift(logit + delta[sub], np.zeros(len(sub), np.int64), 1)[0]
        truth = dataclasses.replace(
            truth, b0=truth.b0 + level, post_bias=truth.post_bias + delta[truth.post_subtopic]
        )
    return truth


# ----------------------------------------------------------------------------- the tables


def _assemble_feed(
    truth: GroundTruth, user: np.ndarray, post: np.ndarray, seconds: np.ndarray, liked: np.ndarray,
    logit: np.ndarray, rng: np.random.Generator,
) -> tuple[pd.DataFrame, np.ndarray]:  # fmt: skip
    """feed_data sorted by time (views, and a like after each liked view) and the like logit per row."""
    same_user_next = np.r_[user[1:] == user[:-1], False]
    next_seconds = np.where(same_user_next, np.r_[seconds[1:], 0], SPAN_SECONDS + 1)
    delay = np.rint(LIKE_DELAY_MEDIAN_S * np.exp(LIKE_DELAY_SIGMA * rng.standard_normal(len(user))))
    # Before the user's next view, so that view's history already holds this like.
    delay = np.clip(delay, 1, next_seconds - seconds - 1).astype(np.int64)
    row_seconds = np.concatenate([seconds, (seconds + delay)[liked]])
    row_user = np.concatenate([user, user[liked]]).astype(np.int64)
    row_post = np.concatenate([post, post[liked]])
    is_like = np.r_[np.zeros(len(user), dtype=np.int8), np.ones(int(liked.sum()), dtype=np.int8)]
    target = np.r_[liked.astype(np.int64), np.zeros(int(liked.sum()), dtype=np.int64)]
    row_logit = np.r_[logit, np.full(int(liked.sum()), np.nan)]
    # (second, user) is unique per row, so this key orders the feed completely.
    order = np.argsort(((row_seconds << 20 | row_user) << 1) | is_like)
    stamps = ((truth.start_s + row_seconds[order]) * 1_000_000_000).astype("datetime64[ns]")
    feed = pd.DataFrame(
        {
            "timestamp": stamps,
            "user_id": truth.user_ids[row_user[order]],
            "post_id": truth.post_ids[row_post[order]],
            "action": pd.Series(
                pd.Categorical.from_codes(is_like[order], categories=["view", "like"])
            ).astype("str"),
            "target": pd.arrays.IntegerArray(target[order], np.zeros(len(order), dtype=bool)),
        }
    )
    return feed, row_logit[order]


def _resolve_scale(scale: str | Scale) -> Scale:
    if isinstance(scale, Scale):
        return scale
    if scale not in SCALES:
        raise ValueError(f"unknown demo scale {scale!r}: choose one of {sorted(SCALES)} or pass a Scale")
    return SCALES[scale]


def generate(scale: str | Scale, *, seed: int, progress: bool = True) -> DemoData:
    """The three tables and the ground truth, identical for the same scale and seed."""
    scale = _resolve_scale(scale)
    rng_users, rng_posts, rng_text, rng_model, rng_views, rng_likes = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)
    )
    users, codes = _make_users(scale, rng_users)
    post_ids, topic, subtopic = _make_posts(scale, rng_posts)
    posts = pd.DataFrame(
        {
            "post_id": post_ids,
            "text": pd.Series(_make_texts(topic, subtopic, rng_text), dtype="str"),
            "topic": pd.Series(np.array(list(TOPIC_COUNTS), dtype=object)[topic], dtype="str"),
        }
    )
    truth = _make_truth(codes, users["user_id"].to_numpy(), post_ids, topic, subtopic, rng_model)

    user, seconds = _view_times(scale, rng_views)
    post = _sample_posts(truth, user, seconds, rng_views)
    per_user = np.bincount(user, minlength=scale.n_users)
    user_first = np.cumsum(per_user) - per_user
    uniform = rng_likes.random(len(user))
    epoch_seconds = seconds + truth.start_s
    truth = _calibrate(truth, user, post, epoch_seconds, user_first, per_user, uniform, rng_likes)
    static = _base_logit(truth, user, post, epoch_seconds) + truth.b0
    logit, liked = _simulate_likes(static, post, user_first, per_user, uniform, truth, progress=progress)
    feed, like_logit = _assemble_feed(truth, user, post, seconds, liked, logit, rng_likes)
    truth = dataclasses.replace(truth, tables=tables_fingerprint(users, posts, feed))
    return DemoData(users=users, posts=posts, feed=feed, truth=truth, like_logit=like_logit)


def main(argv: list[str] | None = None) -> None:
    settings = Settings()
    parser = argparse.ArgumentParser(description="Write the demo tables as CSV files and the truth as .npz.")
    parser.add_argument(
        "--scale", default=settings.demo_scale, choices=SCALE_NAMES, help="default: DEMO_SCALE"
    )
    parser.add_argument("--seed", type=int, default=settings.seed, help="default: SEED")
    parser.add_argument("--out", type=Path, default=Path("data") / "demo_csv")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    demo = generate(args.scale, seed=args.seed, progress=True)
    print(f"generated {len(demo.feed):,} feed rows in {time.perf_counter() - began:.1f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    demo.users.to_csv(args.out / "users.csv", index=False)
    demo.posts.to_csv(args.out / "posts.csv", index=False)
    demo.feed.to_csv(args.out / "feed.csv", index=False, date_format="%Y-%m-%d %H:%M:%S")
    demo.truth.save(args.out / "demo_truth.npz")
    print(f"wrote users.csv, posts.csv, feed.csv and demo_truth.npz to {args.out}")


if __name__ == "__main__":
    main()
