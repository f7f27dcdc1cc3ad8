// SPDX-License-Identifier: Apache-2.0

package config

import (
	"strings"
	"testing"
	"time"
)

// haPair is one gateway of an HA pair.
const haPair = `lan: {interfaces: [lan0]}
nat: snat
uplinks:
  - {name: dsl1, interface: wan1, gateway: 198.51.100.1, address: 198.51.100.2/28, vip: 198.51.100.4/28}
  - {name: dsl2, interface: wan2, gateway: 198.51.100.17, address: 198.51.100.18/28, vip: 198.51.100.20/28}
ha:
  sync_interface: sync0
  address: 203.0.113.249
  peer: 203.0.113.250
  lan_vip: 192.0.2.1/24
`

func TestParseHA(t *testing.T) {
	c, err := Parse("ha.yaml", []byte(haPair))
	if err != nil {
		t.Fatal(err)
	}
	ha := c.HA
	if ha == nil || ha.Priority != DefaultHAPriority || ha.RouterID != DefaultHARouterID || ha.AdvertInterval != DefaultHAAdvertInterval {
		t.Fatalf("ha %+v: want the defaults filled in", ha)
	}
	if ha.LANVIPPrefix.String() != "192.0.2.1/24" || ha.PeerAddr.String() != "203.0.113.250" || ha.AddressAddr.String() != "203.0.113.249" {
		t.Errorf("ha %+v: parsed addresses wrong", ha)
	}
	if v := c.Lines[1].VIPPrefix.String(); v != "198.51.100.20/28" {
		t.Errorf("dsl2's vip %s", v)
	}
	c, err = Parse("ha.yaml", []byte(haPair+"  priority: 150\n  virtual_router_id: 7\n  advert_interval: 30ms\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.HA.Priority != 150 || c.HA.RouterID != 7 || c.HA.AdvertInterval != 30*time.Millisecond {
		t.Errorf("ha %+v: want the values set", c.HA)
	}
}

// Every mistake in an HA pair's config is reported with its line, one
// error each.
func TestParseHAErrors(t *testing.T) {
	for _, tc := range []struct{ name, yaml, want string }{
		{"masquerade", strings.Replace(haPair, "nat: snat", "nat: masquerade", 1), `ha.yaml:2: nat: an HA pair needs nat: snat`},
		{"vip missing", strings.Replace(haPair, ", vip: 198.51.100.20/28", "", 1), "ha.yaml:5: uplinks[1].vip: missing"},
		{"vip without ha", strings.Replace(haPair[:strings.Index(haPair, "ha:")], ", vip: 198.51.100.20/28", "", 1), "ha.yaml:4: uplinks[0].vip: a line's vip belongs to an HA pair"},
		{"vip outside the subnet", strings.Replace(haPair, "vip: 198.51.100.4/28", "vip: 198.51.100.40/28", 1), "ha.yaml:4: uplinks[0].vip: the gateway 198.51.100.1 is outside the vip's subnet 198.51.100.32/28"},
		{"vip is the own address", strings.Replace(haPair, "vip: 198.51.100.4/28", "vip: 198.51.100.2/28", 1), "ha.yaml:4: uplinks[0].vip: 198.51.100.2 is the line's gateway or own address"},
		{"vip without length", strings.Replace(haPair, "vip: 198.51.100.4/28", "vip: 198.51.100.4", 1), `ha.yaml:4: uplinks[0].vip: want an IPv4 address with prefix length`},
		{"sync on a line", strings.Replace(haPair, "sync_interface: sync0", "sync_interface: wan1", 1), "ha.yaml:7: ha.sync_interface: wan1 is the interface of uplinks[0]"},
		{"sync on the LAN", strings.Replace(haPair, "sync_interface: sync0", "sync_interface: lan0", 1), "ha.yaml:7: ha.sync_interface: lan0 is a LAN interface"},
		{"peer is self", strings.Replace(haPair, "peer: 203.0.113.250", "peer: 203.0.113.249", 1), "ha.yaml:9: ha.peer: 203.0.113.249 is this gateway's own address"},
		{"peer not an address", strings.Replace(haPair, "peer: 203.0.113.250", "peer: gw2", 1), `ha.yaml:9: ha.peer: want this end's unicast IPv4 address on the sync link, got "gw2"`},
		{"priority 255", haPair + "  priority: 255\n", "ha.yaml:11: ha.priority: want 1..254 (255 is VRRP's address owner), got 255"},
		{"router id 0", haPair + "  virtual_router_id: 0\n", "ha.yaml:11: ha.virtual_router_id: want 1..255, got 0"},
		{"advert not in centiseconds", haPair + "  advert_interval: 15ms\n", "ha.yaml:11: ha.advert_interval: want 10ms..40.95s in steps of 10ms"},
		{"lan vip missing", strings.Replace(haPair, "  lan_vip: 192.0.2.1/24\n", "", 1), "ha.yaml:7: ha.lan_vip: missing"},
		{"lan vip is the network", strings.Replace(haPair, "lan_vip: 192.0.2.1/24", "lan_vip: 192.0.2.0/24", 1), "ha.yaml:10: ha.lan_vip: 192.0.2.0 is the network or broadcast address of 192.0.2.0/24"},
		{"unknown ha key", haPair + "  preempt: false\n", "ha.yaml:11: ha.preempt: unknown key"},
		{"vip wider than the line", strings.Replace(haPair, "vip: 198.51.100.4/28", "vip: 198.51.100.4/8", 1), "ha.yaml:4: uplinks[0].vip: 198.51.100.4/8: want the line's own prefix length /28"},
		{"peer is a line's address", strings.Replace(haPair, "peer: 203.0.113.250", "peer: 198.51.100.18", 1), "ha.yaml:9: ha.peer: 198.51.100.18 is also an address of uplinks[1]"},
		{"empty ha block", strings.NewReplacer(", vip: 198.51.100.4/28", "", ", vip: 198.51.100.20/28", "").Replace(haPair[:strings.Index(haPair, "ha:")]) + "ha:\n", "ha.yaml:6: ha: an empty ha block"},
		{"nat left out", strings.Replace(haPair, "nat: snat\n", "", 1), "ha.yaml:6: ha: an HA pair needs nat: snat"},
		{"datapath off", haPair + "datapath: {enabled: false}\n", "ha.yaml:11: datapath.enabled: an HA pair needs the datapath"},
		{"lan vip is a line's address", strings.Replace(haPair, "lan_vip: 192.0.2.1/24", "lan_vip: 198.51.100.18/28", 1), "ha.yaml:10: ha.lan_vip: 198.51.100.18 is also an address of uplinks[1]"},
		{"vip is the network", strings.Replace(haPair, "vip: 198.51.100.4/28", "vip: 198.51.100.0/28", 1), "ha.yaml:4: uplinks[0].vip: 198.51.100.0 is the network or broadcast address of 198.51.100.0/28"},
		{"lan vip is a line's vip", strings.Replace(haPair, "lan_vip: 192.0.2.1/24", "lan_vip: 198.51.100.4/28", 1), "ha.yaml:10: ha.lan_vip: 198.51.100.4 is also an address of uplinks[0].vip"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("ha.yaml", []byte(tc.yaml))
			if err == nil {
				t.Fatalf("no error; want %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error:\n%v\nwant it to contain:\n%s", err, tc.want)
			}
			if n := strings.Count(err.Error(), "\n") + 1; n != 1 {
				t.Errorf("want one error, got %d:\n%v", n, err)
			}
		})
	}
}
