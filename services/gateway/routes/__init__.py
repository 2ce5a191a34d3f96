"""Every API route, collected from one module per resource."""
from services.gateway.routes import links, lists, messages, offers, postbacks

ROUTES = [*offers.ROUTES, *lists.ROUTES, *links.ROUTES, *messages.ROUTES, *postbacks.ROUTES]
