"""Every API route, collected from one module per resource."""
from services.gateway.routes import (
    contacts, history, links, lists, messages, offers, postback_log, postbacks, reports, revenue,
)

ROUTES = [
    *offers.ROUTES, *lists.ROUTES, *links.ROUTES, *messages.ROUTES, *postbacks.ROUTES, *postback_log.ROUTES,
    *revenue.ROUTES, *history.ROUTES, *reports.ROUTES, *contacts.ROUTES,
]
