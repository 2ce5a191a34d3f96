"""Which user agents are link-preview fetchers or crawlers rather than a person.

They still get the redirect (a preview that 404s looks broken), but their click is stored with
``is_bot`` and never counts. Anything not recognised is a person: curl, scripts and apps with
unusual user agents count, because missing a real click is worse than counting a rare script.
"""
from __future__ import annotations

import re

# Named preview fetchers and crawlers first (iMessage sends "facebookexternalhit/1.1 Facebot
# Twitterbot/1.0"), then the generic words crawlers put in their names.
BOT_RE = re.compile(
    r"facebookexternalhit|facebot|facebookcatalog|meta-externalagent|twitterbot|whatsapp|slackbot"
    r"|slack-imgproxy|telegrambot|discordbot|linkedinbot|googlebot|google-inspectiontool|adsbot-google"
    r"|apis-google|mediapartners-google|bingbot|bingpreview|msnbot|yandex(?:bot|images)|baiduspider"
    r"|duckduckbot|applebot|pinterestbot|redditbot|embedly|skypeuripreview|vkshare|iframely"
    r"|quora link preview|nuzzel|bitlybot|petalbot|semrushbot"
    r"|ahrefsbot|mj12bot|dotbot|headlesschrome|lighthouse|mastodon|google-pagerenderer|googleimageproxy"
    r"|existence discovery|kakaotalk-scrap|google-read-aloud|googleother|google-safety"
    r"|\byeti/|qwantify|ia_archiver|google-site-verification|google favicon|flipboardproxy"
    r"|bot\b|bot/|_bot|-bot|crawl|spider|preview|scrape|slurp|fetcher",
    re.IGNORECASE,
)
# Phone makers whose model names end in "bot".
_HUMAN_RE = re.compile(r"\bcubot\b", re.IGNORECASE)

_MEMO_LIMIT = 10_000
_memo: dict[str, bool] = {}


def is_bot(user_agent: str | None) -> bool:
    if not user_agent:
        return False
    known = _memo.get(user_agent)
    if known is not None:
        return known
    found = BOT_RE.search(_HUMAN_RE.sub("", user_agent)) is not None
    if len(_memo) >= _MEMO_LIMIT:
        _memo.clear()
    _memo[user_agent] = found
    return found
