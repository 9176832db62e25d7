# A minimal tunfw image: the static binary and the example config, nothing
# else. Build the binary first (no network is needed in the image build):
#
#   make build && docker build -t tunfw .
#
# Police the egress of the container itself (it needs NET_ADMIN, NET_RAW and
# the TUN device, nothing else, not --privileged; once set up it drops every
# other capability itself):
#
#   docker run --cap-drop ALL --cap-add NET_ADMIN --cap-add NET_RAW \
#     --device /dev/net/tun -v ./config.toml:/etc/tunfw/config.toml:ro tunfw
#
# or as a sidecar whose network namespace other containers join with
# --network container:NAME. See README.md, "Containers".
FROM scratch
COPY bin/tunfw /usr/bin/tunfw
COPY config.toml /etc/tunfw/config.toml
ENTRYPOINT ["/usr/bin/tunfw"]
CMD ["up"]
