"""Link-preview fetchers and crawlers: redirected, stored as bots, never counted."""
from __future__ import annotations

import asyncpg
import httpx
import pytest

from services.redirect.bots import is_bot
from tests.helpers import Tenant
from tests.redirect.conftest import PHONE_UA, Edge, drain, offer_and_link

BOTS = [
    "facebookexternalhit/1.1 Facebot Twitterbot/1.0",  # iMessage preview
    "WhatsApp/2.23.20.0 A",
    "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
    "TelegramBot (like TwitterBot)",
    "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
    "Twitterbot/1.0",
    "Mozilla/5.0 (compatible; Discordbot/2.0; +https://discordapp.com)",
    "Google-Safety",  # Gmail's link scanner
    "LinkedInBot/1.0 (compatible; Mozilla/5.0; Apache-HttpClient +http://www.linkedin.com)",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "SomeCrawler/3.1",
    "my-spider 0.1",
    "Acme Link Preview Service",
    "Mozilla/5.0 (compatible; SuperBot/1.0)",
    "http.rb/5.1.1 (Mastodon/4.2.0; +https://mastodon.social/) Bot",
    "http.rb/5.1.1 (Mastodon/4.2.0; +https://mastodon.social/)",
    "Mozilla/5.0 (compatible; Google-PageRenderer; +https://developers.google.com/search)",
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
    "Microsoft Office Existence Discovery",
    "kakaotalk-scrap/1.0; +https://devtalk.kakao.com/public/robots",
    "Mozilla/5.0 (X11; Linux x86_64; Google-Read-Aloud; +https://support.google.com/webmasters/answer/1061943)",
    "GoogleOther",
    "Mozilla/5.0 (compatible; Yeti/1.1; +http://naver.me/spd)",  # Naver
    "Mozilla/5.0 (compatible; Qwantify/2.4w; +https://www.qwant.com/)/2.4w",
    "ia_archiver (+http://www.alexa.com/site/help/webmasters; crawler@alexa.com)",
    "Mozilla/5.0 (compatible; Google-Site-Verification/1.0)",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/49.0.2623.75 Safari/537.36 Google Favicon",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.11; rv:49.0) Gecko/20100101 Firefox/49.0 (FlipboardProxy/1.2; +http://flipboard.com/browserproxy)",
]
HUMANS = [
    PHONE_UA,
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 9; CUBOT X19) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/88.0 Mobile Safari/537.36",
    "curl/8.5.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 Snapchat/12.60.0.46 (like Safari/8614.1.25.0.31, panda)",
    "",
]


@pytest.mark.parametrize("ua", BOTS)
def test_bots_are_recognised(ua: str) -> None:
    assert is_bot(ua)


@pytest.mark.parametrize("ua", HUMANS)
def test_people_are_not_bots(ua: str) -> None:
    assert not is_bot(ua)


async def test_bot_clicks_are_redirected_and_stored_flagged(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge, db: asyncpg.Pool, redis: object
) -> None:
    _, link = await offer_and_link(api, tenant, "https://lp.example/land?ua={user_agent}")
    for ua in BOTS[:10]:
        location = await edge.click(link["shortUrl"], headers={"user-agent": ua})
        assert location.startswith("https://lp.example/land?ua=")
    await edge.click(link["shortUrl"])
    await drain(db, redis)
    rows = await db.fetch("SELECT user_agent, is_bot FROM clicks WHERE account_id = $1", tenant.account_id)
    flags = {r["user_agent"]: r["is_bot"] for r in rows}
    assert flags == {**{ua: True for ua in BOTS[:10]}, PHONE_UA: False}
