#!/usr/bin/env bash
# Installs the system services the test suite starts itself (on free loopback ports, in
# temp dirs). Missing ones are installed with apt-get when running as root; otherwise this
# says what to install and fails, since in CI a missing service is a failure, not a skip.
set -euo pipefail

# command  debian-package
needed=(
  mosquitto mosquitto
  influxd influxdb
  victoria-metrics victoria-metrics
  chromium chromium
)

missing=()
for ((i = 0; i < ${#needed[@]}; i += 2)); do
  command -v "${needed[i]}" >/dev/null 2>&1 || [[ -x "/usr/sbin/${needed[i]}" ]] || missing+=("${needed[i + 1]}")
done
((${#missing[@]} == 0)) && exit 0

if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
  echo "installing test services: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "the tests need these system packages: ${missing[*]}" >&2
  echo "install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}) and run make test again" >&2
  exit 1
fi
