"""Feast entities: the two keys every feature hangs off."""

from feast import Entity, ValueType

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A person receiving recommendations; `user_id` as in the request log.",
)

request = Entity(
    name="request",
    join_keys=["request_id"],
    value_type=ValueType.STRING,
    description="One pre-ranking request (a user at a time with its candidates); `request_id`.",
)

item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.STRING,
    description="A catalog item that can be recalled, pre-ranked and exposed; `item_id`.",
)
