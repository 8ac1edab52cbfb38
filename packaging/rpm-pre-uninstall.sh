# $1: 0 on erase, 1 on upgrade. On erase, stop the services the package runs.
if [ "$1" = 0 ]; then
    systemctl disable --now shelltrail-agent.service shelltrail-collector.service >/dev/null 2>&1 || :
fi
